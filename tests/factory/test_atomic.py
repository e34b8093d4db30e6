"""Atomicity: a surgery that fails part-way leaves the model exactly as before (injected failures)."""

from __future__ import annotations

import pytest
import torch
from utils import assert_unchanged, model_snapshot, tiny_hf_model, tokens

import myllm  # noqa: F401
from myllm.blocks.ffn import DenseFFN
from myllm.factory import engine as replace_module
from myllm.factory import movers, postnorm, recipe, replace
from myllm.surgery import add_experts
from myllm.surgery import experts as experts_module


class Boom(RuntimeError):
    pass


def _fail_on_call(n: int, fn):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Boom(f"injected failure on call {n}")
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("call", [1, 2])
def test_failure_in_weight_fill_restores(monkeypatch, call):
    model = tiny_hf_model("qwen2")
    snap = model_snapshot(model)
    mover = movers.SameStateMover
    monkeypatch.setattr(mover, "fill", _fail_on_call(call, mover.fill))
    with pytest.raises(Boom):
        replace(model, "attention", "eager")
    assert_unchanged(model, snap)


@pytest.mark.parametrize("call", [2, 5])
def test_failure_in_swap_restores(monkeypatch, call):
    model = tiny_hf_model("llama")
    snap = model_snapshot(model)
    monkeypatch.setattr(replace_module, "_swap", _fail_on_call(call, replace_module._swap))
    with pytest.raises(Boom):
        replace(model, "norm", "layernorm")  # 5 norms: 2 layers x 2 + final
    assert_unchanged(model, snap)


def test_failure_in_post_norm_switch_restores(monkeypatch):
    model = tiny_hf_model("mistral")
    snap = model_snapshot(model)
    monkeypatch.setattr(postnorm, "reclass", _fail_on_call(2, postnorm.reclass))
    with pytest.raises(Boom):
        replace(model, "norm", "deepnorm")
    assert_unchanged(model, snap)


def test_failure_while_recording_restores_classes_and_config(monkeypatch):
    model = tiny_hf_model("qwen3")
    replace(model, "attention", "sdpa", layers=[0])  # already promoted, one entry recorded
    snap = model_snapshot(model)

    def broken_record(model, entry, config_updates=None):
        undo = original(model, entry, config_updates)
        undo()
        raise Boom("record failed after writing")

    original = recipe.record
    monkeypatch.setattr(recipe, "record", broken_record)
    with pytest.raises(Boom):
        replace(model, "ffn", "dense")
    assert_unchanged(model, snap)


class CopyingMover(movers.Mover):
    """Test mover: copies (does not share) dense weights, and is invertible, so the engine releases old tensors."""

    name = "test-copy"
    kinds = ("ffn",)
    invertible = True
    seen_released: list[bool] = []

    def accepts(self, kind, old, spec, kwargs):
        return None if spec.name == "dense" and hasattr(old, "gate_proj") else "not a dense MLP"

    def fill(self, old, new, options):
        # the engine released the previous targets already: their tensors are empty now
        self.seen_released.append(bool(self.previous) and all(p.numel() == 0 for p in self.previous.parameters()))
        with torch.no_grad():
            for name, p in new.named_parameters():
                p.copy_(old.get_parameter(name))
        self.previous = old

    def restore(self, old, new):
        with torch.no_grad():
            for name, p in old.named_parameters():
                p.copy_(new.get_parameter(name))


def test_released_tensors_are_rebuilt_exactly_on_failure(monkeypatch):
    model = tiny_hf_model("llama", num_hidden_layers=3)
    ids = tokens()
    ref = model(ids).logits
    snap = model_snapshot(model)
    mover = CopyingMover()
    mover.previous = None
    mover.seen_released = []
    monkeypatch.setattr(movers, "MOVERS", [mover, *movers.MOVERS])
    original_fill = CopyingMover.fill
    monkeypatch.setattr(CopyingMover, "fill", _fail_on_call(3, original_fill))
    with pytest.raises(Boom):
        replace(model, "ffn", "dense")
    assert mover.seen_released == [False, True]  # layer 0 was released before layer 1 was filled
    assert_unchanged(model, snap)
    assert torch.equal(model(ids).logits, ref)

    # and without a failure the same mover gives a model whose old MLP tensors were freed
    old_mlps = [layer.mlp for layer in model.model.layers]
    monkeypatch.setattr(CopyingMover, "fill", original_fill)
    replace(model, "ffn", "dense")
    assert all(type(layer.mlp) is DenseFFN for layer in model.model.layers)
    assert all(p.numel() == 0 for m in old_mlps for p in m.parameters())
    assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("where", ["freeze", "record"])
def test_add_experts_failure_restores(monkeypatch, where):
    model = tiny_hf_model("mixtral")
    snap = model_snapshot(model)
    if where == "freeze":
        monkeypatch.setattr(
            experts_module.freezing, "freeze_rows", _fail_on_call(4, experts_module.freezing.freeze_rows)
        )
    else:
        monkeypatch.setattr(recipe, "record", _fail_on_call(1, recipe.record))
    with pytest.raises(Boom):
        add_experts(model, 2)
    assert_unchanged(model, snap)
    assert model.model.layers[0].mlp.experts.num_experts == 4
    assert all(not hasattr(p, "_myllm_frozen_rows") for p in model.parameters())
