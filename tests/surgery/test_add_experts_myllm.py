"""add_experts on MyLLM models: the entry lives in ``config.myllm_surgeries`` and is replayed when the model is
built, so the grown model saves and loads as itself; unchanged at insertion, new experts learn, old stay frozen."""

from __future__ import annotations

import pytest
import torch
import transformers
from utils import assert_close, max_abs_diff, tiny_myllm, tokens

from myllm.factory import replace
from myllm.factory.layout import LayoutError
from myllm.surgery import add_experts, freeze_recorded_experts, moe_parts

MOE = {"name": "moe", "n_experts": 4, "top_k": 2, "intermediate_size": 16, "balance": {"switch": 0.01}}


def _moe_model(**ffn):
    return tiny_myllm(num_hidden_layers=3, ffn={**MOE, **ffn}, layer_overrides={"0": {"ffn": "dense"}})


def _train(model, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    ids = tokens(2, 9, seed=5)
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_insertion_keeps_outputs_and_the_model_reloads_as_itself(tmp_path, dtype):
    model = _moe_model()
    ids = tokens()
    ref = model(ids).logits
    add_experts(model, 2, layers=[1, 2], top_k_new=1)
    assert [e["op"] for e in model.config.myllm_surgeries] == ["add_experts"]
    assert moe_parts(model.model.layers[1].mlp)[0].gate_up_proj.shape[0] == 6
    assert max_abs_diff(model(ids).logits, ref) <= 1e-5
    model.save_pretrained(tmp_path)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True, dtype=dtype)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(loaded).__name__ == "MyLLMForCausalLM"
    assert (
        moe_parts(loaded.model.layers[2].mlp)[2].myllm_groups == moe_parts(model.model.layers[2].mlp)[2].myllm_groups
    )
    if dtype == torch.float32:
        assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6)
    else:  # the same weights, rounded
        assert max_abs_diff(loaded(ids).logits.float(), model(ids).logits) < 0.2
    with torch.no_grad():  # non-vacuity: a new expert with a non-zero output projection changes the outputs
        moe_parts(model.model.layers[1].mlp)[0].down_proj[4:] = 1.0
    assert max_abs_diff(model(ids).logits, ref) > 1e-3


def test_new_experts_learn_and_old_ones_stay_bit_identical_under_adamw():
    model = _moe_model()
    add_experts(model, 2, init="random")
    experts, _, router, _ = moe_parts(model.model.layers[2].mlp)
    tensors = (experts.gate_up_proj, experts.down_proj, router.weight)
    before = [t.detach().clone() for t in tensors]
    _train(model)
    for t, b in zip(tensors, before, strict=True):
        assert torch.equal(t[:4], b[:4])
        assert not torch.equal(t[4:], b[4:])


def test_bad_requests_leave_the_model_unchanged():
    model = _moe_model()
    before = _state(model)
    with pytest.raises(LayoutError, match="dense layer"):
        add_experts(model, 2, layers=[0, 1])
    assert model.config.myllm_surgeries is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    add_experts(model, 1, layers=[1])
    grown = _state(model)
    with pytest.raises(LayoutError, match="hold experts inserted by add_experts"):
        replace(model, "ffn", "moe", n_experts=4, top_k=1, layers=[1])
    assert model.config.ffn["top_k"] == 2 and all(torch.equal(v, grown[k]) for k, v in model.state_dict().items())
    replace(model, "ffn", "dense", layers=[0])  # other layers can still change
    with pytest.raises(ValueError, match="recorded surgeries"):
        model.to_hf("qwen2_moe")


@pytest.mark.parametrize("refreeze", [True, False])
def test_recorded_freezing_is_reapplied_after_loading(tmp_path, refreeze):
    model = _moe_model()
    add_experts(model, 2, layers=[2])
    add_experts(model, 1, layers=[2])  # froze the 4 original experts and the first group of 2
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    experts = moe_parts(loaded.model.layers[2].mlp)[0]
    before = experts.gate_up_proj.detach().clone()
    if refreeze:
        assert freeze_recorded_experts(loaded) == {"model.layers.2.mlp": 6}
    _train(loaded)
    now = experts.gate_up_proj.detach()
    assert torch.equal(now[:6], before[:6]) == refreeze  # without it (freezing is not saved) old rows move
    assert not torch.equal(now[6:], before[6:])
