"""add_experts on HF MoE models: outputs unchanged at insertion, new experts learn, old ones stay bit-identical."""

from __future__ import annotations

import pytest
import torch
from utils import max_abs_diff, tiny_hf_model, tokens

import myllm  # noqa: F401
from myllm.surgery import add_experts, frozen_rows, grow_experts, grow_rows, moe_parts

HF_MOE = ["qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3"]


def _moe_blocks(model):
    return [m for m in model.modules() if moe_parts(m) is not None]


@pytest.mark.parametrize("arch", HF_MOE)
def test_outputs_unchanged_at_insertion_and_check_detects_a_change(arch):
    model = tiny_hf_model(arch)
    ids = tokens()
    ref = model(ids).logits
    n_old = moe_parts(_moe_blocks(model)[0])[0].gate_up_proj.shape[0]
    add_experts(model, 2)
    for block in _moe_blocks(model):
        experts, _, router, _ = moe_parts(block)
        assert experts.gate_up_proj.shape[0] == router.weight.shape[0] == n_old + 2
        assert experts.num_experts == n_old + 2
        assert not experts.down_proj[n_old:].any()  # zero output projections
        assert torch.equal(experts.gate_up_proj[n_old:], experts.gate_up_proj[:2])  # init="copy"
    assert max_abs_diff(model(ids).logits, ref) <= 1e-5
    # non-vacuity: the new experts are really routed to; a non-zero output projection changes the logits
    with torch.no_grad():
        for block in _moe_blocks(model):
            moe_parts(block)[0].down_proj[n_old:] = moe_parts(block)[0].down_proj[:2]
    assert max_abs_diff(model(ids).logits, ref) > 1e-4


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_router_logits_cover_old_and_new_experts(arch):
    model = tiny_hf_model(arch)
    # a first forward installs transformers' output-capture hooks on the HF routers (lazily, by isinstance)
    assert len(model(tokens(), output_router_logits=True).router_logits) == 2
    add_experts(model, 3, top_k_new=2)
    out = model(tokens(), output_router_logits=True, labels=tokens())
    assert len(out.router_logits) == 2  # the grown routers kept the hooks: each layer captured exactly once
    assert all(r.shape == (18, 4 + 3) for r in out.router_logits)
    assert model.num_experts == 7 and torch.isfinite(out.loss)


def _train(model, opt, steps=3):
    model.train()
    ids = tokens(2, 9, seed=1)
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("arch", HF_MOE)
def test_new_experts_learn_frozen_ones_stay_bit_identical_under_adamw(arch):
    model = tiny_hf_model(arch)
    n_old = moe_parts(_moe_blocks(model)[0])[0].gate_up_proj.shape[0]
    add_experts(model, 2)
    parts = [moe_parts(b) for b in _moe_blocks(model)]
    tracked = {(i, k): t for i, (ex, _, r, _) in enumerate(parts)
               for k, t in (("gate_up", ex.gate_up_proj), ("down", ex.down_proj), ("router", r.weight))}  # fmt: skip
    before = {k: t.detach().clone() for k, t in tracked.items()}
    attn_before = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, opt)
    for key, t in tracked.items():
        assert torch.equal(t[:n_old], before[key][:n_old]), f"frozen rows of {key} changed"
        assert frozen_rows(t)[:n_old].all() and not frozen_rows(t)[n_old:].any()
    for i in range(len(parts)):
        assert not torch.equal(tracked[(i, "down")][n_old:], before[(i, "down")][n_old:]), "new experts did not learn"
        assert not torch.equal(tracked[(i, "gate_up")][n_old:], before[(i, "gate_up")][n_old:])
    assert not torch.equal(model.model.layers[0].self_attn.o_proj.weight, attn_before)  # the rest trains


def test_without_freezing_old_experts_train_too():
    """Non-vacuity of the test above: the same training does move old experts when they are not frozen."""
    model = tiny_hf_model("mixtral")
    add_experts(model, 2, freeze_existing=False)
    experts = moe_parts(_moe_blocks(model)[0])[0]
    before = experts.gate_up_proj.detach().clone()
    _train(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    assert not torch.equal(experts.gate_up_proj[:4], before[:4])


def test_second_insertion_is_a_new_group_and_still_preserves_outputs(tmp_path):
    model = tiny_hf_model("qwen3_moe")
    ids = tokens()
    ref = model(ids).logits
    add_experts(model, 2)
    add_experts(model, 1, init="random", seed=5)
    router = moe_parts(_moe_blocks(model)[0])[2]
    assert router.myllm_groups == [(0, 4, 2), (4, 6, 1), (6, 7, 1)]
    assert model.config.num_experts == 7
    # Qwen3MoeConfig stores the count as num_local_experts (num_experts is an alias)
    assert [e["config_updates"]["num_local_experts"] for e in model.config.myllm_surgeries] == [[4, 6], [6, 7]]
    assert max_abs_diff(model(ids).logits, ref) <= 1e-5
    model.save_pretrained(tmp_path)
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert moe_parts(loaded.model.layers[0].mlp)[2].myllm_groups == router.myllm_groups
    assert max_abs_diff(loaded(ids).logits, ref) <= 1e-5


def test_pure_grow_transforms():
    ex = {"gate_up_proj": torch.randn(3, 8, 4), "down_proj": torch.randn(3, 4, 4)}
    grown = grow_experts(ex, 2, init="copy", source=[2, 0])
    assert torch.equal(grown["gate_up_proj"][:3], ex["gate_up_proj"])
    assert torch.equal(grown["gate_up_proj"][3], ex["gate_up_proj"][2])
    assert torch.equal(grown["gate_up_proj"][4], ex["gate_up_proj"][0])
    assert not grown["down_proj"][3:].any()
    unzeroed = grow_experts(ex, 1, init="copy", zero_output=False)
    assert torch.equal(unzeroed["down_proj"][3], ex["down_proj"][0])
    rows = grow_rows(torch.ones(2, 5), 3, init="random", seed=0, std=0.5)
    assert rows.shape == (5, 5) and torch.equal(rows[:2], torch.ones(2, 5))
    assert torch.equal(rows, grow_rows(torch.ones(2, 5), 3, init="random", seed=0, std=0.5))
