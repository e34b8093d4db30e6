"""FFN surgery with MoE blocks: dense -> moe/coe upcycling (copy, split, random), moe -> moe, round trips."""

from __future__ import annotations

import pytest
import torch
import transformers
from utils import assert_close, assert_unchanged, max_abs_diff, model_snapshot, tiny_hf_model, tokens

import myllm  # noqa: F401
from myllm.factory import MoveError, replace
from myllm.factory import movers as movers_module

moe = pytest.importorskip("myllm.blocks.ffn.moe", reason="the moe block comes from the moe branch")

DENSE_ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
HF_MOE = ["qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3"]


@pytest.mark.parametrize("arch", DENSE_ARCHS)
def test_copy_upcycling_preserves_logits_and_round_trips(arch, tmp_path):
    model = tiny_hf_model(arch)
    ids = tokens()
    ref = model(ids).logits
    replace(model, "ffn", "moe", n_experts=4, top_k=2)  # init="copy", renormalised top-k
    block = model.model.layers[0].mlp
    assert isinstance(block, moe.MoE) and block.experts.gate_up_proj.shape == (4, 2 * 64, 32)
    out = model(ids).logits
    assert max_abs_diff(out, ref) <= 1e-5
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.model.layers[1].mlp, moe.MoE)
    assert_close(loaded(ids).logits, out, atol=1e-6)
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_copy_preservation_needs_renormalised_weights_and_detects_changes():
    model = tiny_hf_model("llama")
    ids = tokens()
    ref = model(ids).logits
    replace(model, "ffn", "moe", n_experts=4, top_k=2, norm_topk_prob=False)
    assert max_abs_diff(model(ids).logits, ref) > 1e-3  # gates sum to < 1: not preserved
    model = tiny_hf_model("llama")
    replace(model, "ffn", "moe", n_experts=4, top_k=2)
    with torch.no_grad():  # the router does not matter for copies (any router preserves) ...
        model.model.layers[0].mlp.gate.weight.normal_(0, 1.0)
    assert max_abs_diff(model(ids).logits, ref) <= 1e-5
    with torch.no_grad():  # ... but one changed expert does, and the check sees it
        model.model.layers[0].mlp.experts.down_proj[1] *= 1.5
    assert max_abs_diff(model(ids).logits, ref) > 1e-4


def test_shared_experts_start_silent():
    model = tiny_hf_model("qwen3")
    ids = tokens()
    ref = model(ids).logits
    replace(model, "ffn", "moe", n_experts=4, top_k=2, n_shared_experts=1, shared_gate=True)
    assert not model.model.layers[0].mlp.shared_experts.down_proj.weight.any()
    assert max_abs_diff(model(ids).logits, ref) <= 1e-5


def test_split_upcycling_is_exact_with_all_experts_and_uniform_gates():
    model = tiny_hf_model("llama")
    ids = tokens()
    ref = model(ids).logits
    replace(model, "ffn", "moe", n_experts=4, top_k=4, init="split", init_seed=1)
    assert model.model.layers[0].mlp.experts.down_proj.shape == (4, 32, 16)  # I / E neurons each
    assert model.config.myllm_surgeries[0]["kwargs"]["intermediate_size"] == 16
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()
    assert max_abs_diff(model(ids).logits, ref) <= 1e-5
    with torch.no_grad():  # non-vacuity: non-uniform gates break the identity
        model.model.layers[0].mlp.gate.weight.normal_(0, 0.5)
    assert max_abs_diff(model(ids).logits, ref) > 1e-4


def test_split_with_top_k_below_e_changes_the_function_and_bad_split_is_refused():
    model = tiny_hf_model("llama")
    ids = tokens()
    ref = model(ids).logits
    replace(model, "ffn", "moe", n_experts=4, top_k=2, init="split")
    assert max_abs_diff(model(ids).logits, ref) > 1e-4
    with pytest.raises(MoveError, match=r"divisible by n_experts \(3\)"):
        replace(tiny_hf_model("llama"), "ffn", "moe", n_experts=3, top_k=1, init="split")


def test_random_upcycling_draws_new_experts():
    model = tiny_hf_model("qwen2")
    dense = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    replace(model, "ffn", "moe", n_experts=2, top_k=1, init="random", init_seed=3)
    experts = model.model.layers[0].mlp.experts
    assert not torch.equal(experts.down_proj[0], dense)
    assert experts.gate_up_proj.std().item() == pytest.approx(model.config.initializer_range, rel=0.2)


def test_dense_to_coe():
    model = tiny_hf_model("llama")
    ids = tokens()
    ref = model(ids).logits
    replace(model, "ffn", "coe", n_experts=4, top_k=2, n_iterations=1)  # one iteration is an MoE step
    assert max_abs_diff(model(ids).logits, ref) <= 1e-5
    model = tiny_hf_model("llama")
    replace(model, "ffn", "coe", n_experts=4, top_k=1, n_iterations=2)
    assert isinstance(model.model.layers[0].mlp, moe.CoE) and len(model.model.layers[0].mlp.gates) == 2
    assert max_abs_diff(model(ids).logits, ref) > 1e-4  # the chain re-applies experts: not preserving


@pytest.mark.parametrize("arch", HF_MOE)
def test_hf_moe_to_moe_keeps_experts_and_function(arch, tmp_path):
    model = tiny_hf_model(arch)
    ids = tokens()
    ref = model(ids).logits
    layer = 1  # deepseek_v3's layer 0 is dense
    old = model.model.layers[layer].mlp
    experts = (old.experts.gate_up_proj, old.experts.down_proj)
    replace(model, "ffn", "moe", layers=[layer], balance={"switch": 0.01})
    new = model.model.layers[layer].mlp
    assert isinstance(new, moe.MoE)
    assert new.experts.gate_up_proj is experts[0] and new.experts.down_proj is experts[1]  # kept, not copied
    assert max_abs_diff(model(ids).logits, ref) <= 1e-5
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_close(loaded(ids).logits, ref, atol=1e-5)


def test_moe_to_moe_with_another_router_changes_routing_only():
    model = tiny_hf_model("mixtral")
    ids = tokens()
    ref = model(ids).logits
    replace(model, "ffn", "moe", temperature=4.0)  # a smoother router, same experts
    assert max_abs_diff(model(ids).logits, ref) > 1e-4
    with pytest.raises(MoveError, match="experts are kept"):
        replace(model, "ffn", "moe", n_experts=8)


def test_our_moe_to_moe_changes_balancing():
    model = tiny_hf_model("llama")
    replace(model, "ffn", "moe", n_experts=4, top_k=2)
    ids = tokens()
    ref = model(ids).logits
    replace(model, "ffn", "moe", balance={"loss_free": 1e-3, "switch": 0.01})
    block = model.model.layers[0].mlp
    assert block.block_config.has_score_bias and block.n_experts == 4
    assert max_abs_diff(model(ids).logits, ref) <= 1e-5
    out = model(ids, labels=ids)
    plain = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    aux = sum(layer.mlp.aux_loss() for layer in model.model.layers)
    assert aux > 0 and out.loss.item() == pytest.approx((plain + aux).item(), rel=1e-5)  # aux loss added


def test_copy_upcycling_releases_old_mlps_and_restores_them_on_failure(monkeypatch):
    model = tiny_hf_model("llama", num_hidden_layers=3)
    ids = tokens()
    ref = model(ids).logits
    snap = model_snapshot(model)
    mover = next(m for m in movers_module.MOVERS if m.name == "upcycle")
    old = [layer.mlp for layer in model.model.layers]
    calls = {"n": 0}
    original = type(mover).fill

    def failing_fill(self, old_mlp, new, options):
        calls["n"] += 1
        if calls["n"] == 3:
            # layers 0 and 1 are swapped and their dense tensors already released
            assert all(p.numel() == 0 for m in old[:2] for p in m.parameters())
            raise RuntimeError("injected")
        return original(self, old_mlp, new, options)

    monkeypatch.setattr(type(mover), "fill", failing_fill)
    with pytest.raises(RuntimeError, match="injected"):
        replace(model, "ffn", "moe", n_experts=2, top_k=1)
    assert_unchanged(model, snap)
    assert torch.equal(model(ids).logits, ref)

    monkeypatch.setattr(type(mover), "fill", original)
    replace(model, "ffn", "moe", n_experts=2, top_k=1)
    assert all(p.numel() == 0 for m in old for p in m.parameters())  # freed as the layers were swapped


def test_upcycling_in_bfloat16_keeps_dtype_and_is_exact():
    model = tiny_hf_model("qwen3").to(torch.bfloat16)
    ids = tokens()
    ref = model(ids).logits
    replace(model, "ffn", "moe", n_experts=2, top_k=2)
    block = model.model.layers[0].mlp
    assert block.experts.gate_up_proj.dtype == torch.bfloat16 and block.gate.weight.dtype == torch.bfloat16
    assert torch.equal(block.experts.down_proj[1], block.experts.down_proj[0])
    # the same function up to bf16 rounding of the weighted combine (one ulp of the logits' scale)
    assert max_abs_diff(model(ids).logits, ref) <= 4e-3
