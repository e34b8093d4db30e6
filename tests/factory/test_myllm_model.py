"""replace on MyLLM models: the block specs in MyLLMConfig record the change (no recipe, no promotion)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from utils import assert_close, assert_unchanged, max_abs_diff, model_snapshot, tokens

import myllm
from myllm import models
from myllm.factory import LayoutError, replace
from myllm.surgery import add_experts


def _tiny(**kwargs):
    torch.manual_seed(0)
    config = models.MyLLMConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, **kwargs,
    )  # fmt: skip
    return models.MyLLMForCausalLM(config).eval()


def _reload(model, path):
    model.save_pretrained(path)
    assert json.loads((path / "config.json").read_text()).get("myllm_surgeries") is None  # replace: specs only
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert type(loaded) is models.MyLLMForCausalLM
    return loaded


def test_attention_on_some_layers_becomes_a_layer_override(tmp_path):
    model = _tiny()
    ids = tokens()
    ref = model(ids).logits
    replace(model, "attention", "eager", layers=[0])
    assert model.config.attention == {"name": "sdpa"}
    assert model.config.layer_overrides == {"0": {"attention": {"name": "eager"}}}
    assert type(model) is models.MyLLMForCausalLM
    assert_close(model(ids).logits, ref, atol=2e-6)
    assert_close(_reload(model, tmp_path)(ids).logits, model(ids).logits, atol=1e-6)


def test_ffn_on_every_layer_becomes_the_slot_spec(tmp_path):
    pytest.importorskip("myllm.blocks.ffn.moe")
    model = _tiny()
    ids = tokens()
    ref = model(ids).logits
    replace(model, "ffn", "moe", n_experts=4, top_k=2, init="split")
    assert model.config.ffn == {"name": "moe", "n_experts": 4, "top_k": 2, "intermediate_size": 16}
    assert model.config.layer_overrides == {}
    assert max_abs_diff(model(ids).logits, ref) > 1e-4  # split with top_k < E changes the function
    replace(model, "ffn", "moe", balance={"switch": 0.01}, layers=[1])  # experts kept, layer 1 only
    assert model.config.layer_overrides["1"]["ffn"]["balance"] == {"switch": 0.01}
    assert_close(_reload(model, tmp_path)(ids).logits, model(ids).logits, atol=1e-6)


def test_deepnorm_rewires_residuals_and_final_norm(tmp_path):
    model = _tiny()
    ids = tokens()
    ref = model(ids).logits
    replace(model, "norm", "deepnorm")
    assert model.config.norm == {"name": "deepnorm"}
    assert isinstance(model.model.norm, torch.nn.Identity)
    assert model.model.layers[0].residual_alpha == pytest.approx(4**0.25)
    out = model(ids).logits
    assert max_abs_diff(out, ref) > 1e-3
    fresh = models.MyLLMForCausalLM(model.config)  # the specs alone rebuild the same structure
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.eval()(ids).logits, out)
    assert_close(_reload(model, tmp_path)(ids).logits, out, atol=1e-6)
    replace(model, "norm", "rmsnorm")
    assert type(model.model.norm).__name__ == "RMSNorm" and model.model.layers[1].residual_alpha == 1.0


def test_partial_slots_and_add_experts_on_a_dense_model_are_refused():
    model = _tiny()
    snap = model_snapshot(model)
    with pytest.raises(LayoutError, match="replace all of"):
        replace(model, "norm", "layernorm", targets=r"model\.layers\.0\.input_layernorm")
    with pytest.raises(LayoutError, match="has no MoE layer"):
        add_experts(model, 1)  # (MoE MyLLM models: tests/surgery/test_add_experts_myllm.py)
    assert_unchanged(model, snap)


def test_invalid_specs_restore_the_model(monkeypatch):
    model = _tiny()
    snap = model_snapshot(model)

    def broken(self):
        raise ValueError("injected validation failure")

    monkeypatch.setattr(type(model.config), "validate_blocks", broken)
    with pytest.raises(ValueError, match="injected"):
        replace(model, "attention", "eager")
    monkeypatch.undo()
    assert_unchanged(model, snap)
    assert myllm.MyLLMForCausalLM is models.MyLLMForCausalLM
