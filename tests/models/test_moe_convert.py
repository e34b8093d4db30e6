"""MoE inside MyLLM: import/export of Qwen2-MoE, Qwen3-MoE, Mixtral and DeepSeek-V3 (MLA + MoE), aux losses,
router logits, training.

Parity with the HF models (logits <= 1e-5 in eager and sdpa, left padding, cache) is paired with a perturbed
router the check must detect; the aux loss equals HF's for a model with one MoE layer.
"""

from __future__ import annotations

import pytest
import torch
from test_hf_parity import TOL, _inputs, _parity
from utils import assert_close, max_abs_diff, tiny_hf_model, tiny_myllm

from myllm import MyLLMForCausalLM
from myllm.blocks.ffn import DenseFFN
from myllm.blocks.ffn.moe import MoE, expert_load, update_router_bias

ARCHS = ["qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3"]


def _hf(arch: str, *, attn: str = "sdpa", **overrides):
    """A tiny HF MoE model with O(1)-scale routers (HF initialises some of them to zero)."""
    model = tiny_hf_model(arch, attn_implementation=attn, **overrides)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek: a selection bias that matters
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


@pytest.fixture(params=[(a, i) for a in ARCHS for i in ("eager", "sdpa")], ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request):
    arch, attn = request.param
    hf = _hf(arch, attn=attn)
    return hf, MyLLMForCausalLM.from_hf(hf).eval()


def test_imported_moe_model_matches_hf_logits(pair):
    hf, ours = pair
    assert any(isinstance(m, MoE) for m in ours.modules())
    diffs = _parity(hf, ours)
    assert max(diffs.values()) <= TOL, diffs


def test_imported_moe_model_parity_detects_a_perturbed_router(pair):
    hf, ours = pair
    with torch.no_grad():
        ours.model.layers[1].mlp.gate.weight[0] += 0.1
    assert max(_parity(hf, ours).values()) > TOL


def test_deepseek_v3_imports_dense_first_layers_and_the_selection_bias():
    hf = _hf("deepseek_v3", num_hidden_layers=3, first_k_dense_replace=2)
    ours = MyLLMForCausalLM.from_hf(hf)
    assert [type(layer.mlp) for layer in ours.model.layers] == [DenseFFN, DenseFFN, MoE]
    gate = ours.model.layers[2].mlp.gate
    assert torch.equal(gate.e_score_correction_bias, hf.model.layers[2].mlp.gate.e_score_correction_bias)
    assert gate.n_group == 2 and gate.score_func == "sigmoid"
    assert max(_parity(hf, ours).values()) <= TOL
    with torch.no_grad():  # non-vacuity: the selection bias is used
        gate.e_score_correction_bias.zero_()
    assert max(_parity(hf, ours).values()) > TOL
    with pytest.raises(ValueError, match="dense layers are the first ones"):
        ours.config.layer_overrides = {"2": {"ffn": {"name": "dense"}}}
        ours.to_hf()


def test_qwen_dense_layers_become_layer_overrides():
    hf = _hf("qwen2_moe", mlp_only_layers=[0])
    ours = MyLLMForCausalLM.from_hf(hf)
    assert isinstance(ours.model.layers[0].mlp, DenseFFN) and isinstance(ours.model.layers[1].mlp, MoE)
    assert ours.config.layer_overrides == {"0": {"ffn": {"name": "dense"}}}
    assert max(_parity(hf, ours).values()) <= TOL


def test_aux_loss_and_router_logits_match_hf_with_one_moe_layer():
    """One MoE layer: HF's cross-layer formula is the per-layer one, so the losses agree exactly."""
    hf = _hf("qwen2_moe", mlp_only_layers=[0], output_router_logits=True, router_aux_loss_coef=0.02)
    ours = MyLLMForCausalLM.from_hf(hf)
    assert ours.config.ffn["balance"] == {"switch": 0.02}
    x, mask = _inputs()
    labels = x.masked_fill(mask == 0, -100)
    a = ours(x, attention_mask=mask, labels=labels)
    b = hf(x, attention_mask=mask, labels=labels)
    assert len(a.router_logits) == 1
    assert len(b.router_logits) == 1  # HF records the MoE layers only, as we do
    assert_close(a.router_logits[0], b.router_logits[0].float(), atol=1e-5)
    assert_close(a.aux_loss, 0.02 * b.aux_loss, atol=1e-6)
    assert_close(a.loss, b.loss, atol=1e-5)
    assert abs(a.aux_loss.item()) > 1e-3  # non-vacuous


def test_switch_coefficient_is_shared_across_moe_layers():
    hf = _hf("mixtral", output_router_logits=True, router_aux_loss_coef=0.02)
    ours = MyLLMForCausalLM.from_hf(hf)
    assert ours.config.ffn["balance"] == {"switch": 0.01}  # two MoE layers
    back = ours.to_hf()
    assert back.config.router_aux_loss_coef == pytest.approx(0.02) and back.config.output_router_logits


DENSE_LAYER = {"qwen2_moe": {"mlp_only_layers": [1]}, "qwen3_moe": {"mlp_only_layers": [1]}, "mixtral": {}}


@pytest.mark.parametrize("arch", ARCHS)
def test_to_hf_exports_back_exactly(arch):
    hf = _hf(arch, **DENSE_LAYER.get(arch, {}))  # deepseek_v3: first_k_dense_replace=1 in the tiny config
    back = MyLLMForCausalLM.from_hf(hf).to_hf()
    assert type(back) is type(hf)
    theirs = hf.state_dict()
    mine = back.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key
    x, _ = _inputs()
    with torch.no_grad():
        assert max_abs_diff(back(x).logits, hf(x).logits) == 0.0


def test_to_hf_refuses_what_the_target_cannot_express():
    ours = MyLLMForCausalLM.from_hf(_hf("qwen2_moe"))
    ours.config.ffn = {**ours.config.ffn, "temperature": 2.0}
    with pytest.raises(ValueError, match="qwen2_moe cannot express this MoE block: temperature"):
        ours.to_hf()
    mixtral = tiny_myllm(
        ffn={"name": "moe", "n_experts": 4, "top_k": 2, "intermediate_size": 16},
        layer_overrides={"0": {"ffn": "dense"}},
    )
    with pytest.raises(ValueError, match="layers \\[0\\] have a dense FFN"):
        mixtral.to_hf("mixtral")


def _moe_myllm(**ffn):
    spec = {"name": "moe", "n_experts": 4, "top_k": 2, "intermediate_size": 16, **ffn}
    return tiny_myllm(num_hidden_layers=3, ffn=spec, layer_overrides={"0": {"ffn": "dense"}})


def test_moe_myllm_trains_saves_loads_and_reports_load(tmp_path):
    model = _moe_myllm(n_shared_experts=1, balance={"switch": 0.01, "loss_free": 1e-3}).train()
    assert isinstance(model.model.layers[0].mlp, DenseFFN)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 128, (4, 12))
    losses = []
    for _ in range(8):
        out = model(x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        update_router_bias(model)
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    load = expert_load(model)
    assert set(load) == {"model.layers.1.mlp", "model.layers.2.mlp"}
    assert sum(load["model.layers.1.mlp"]["tokens_per_expert"]) == 4 * 12 * 2
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0
    model.save_pretrained(tmp_path)
    back = MyLLMForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(back.model.layers[1].mlp.gate.e_score_correction_bias, bias)
    model.eval()
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)


def test_moe_myllm_generates_with_a_cache():
    model = _moe_myllm()
    x = torch.randint(0, 128, (2, 5))
    out = model.generate(x, max_new_tokens=4, do_sample=False)
    with torch.no_grad():  # greedy continuation without the cache, token by token
        seq = x
        for _ in range(4):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_aux_loss_gradients_survive_gradient_checkpointing():
    model = _moe_myllm(balance={"z_loss": 1.0}).train()
    model.activation_checkpointing_enable()
    x = torch.randint(0, 128, (2, 6))
    out = model(x, labels=x, output_router_logits=True)
    (out.aux_loss * 1.0).backward()
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
