"""freeze / unfreeze by kind, layer, pattern and expert rows; the trainable-parameter report."""

from __future__ import annotations

import pytest
import torch
from utils import tiny_hf_model, tokens

import myllm  # noqa: F401
from myllm.surgery import freeze, frozen_rows, trainable_report, unfreeze


def _count(model, pred):
    return sum(p.numel() for n, p in model.named_parameters() if pred(n))


def test_freeze_by_kind_layers_and_pattern_with_report(capsys):
    model = tiny_hf_model("llama")
    total = sum(p.numel() for p in model.parameters())
    report = freeze(model, kind="attention")
    assert "trainable parameters" in capsys.readouterr().out
    attn = _count(model, lambda n: ".self_attn." in n)
    assert report.total == total and report.trainable == total - attn
    assert report.groups["attention"] == [0, attn]
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".self_attn." in n)

    report = freeze(model, layers=[1], verbose=False)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("model.layers.1."))
    assert model.model.layers[0].mlp.up_proj.weight.requires_grad

    report = freeze(model, r"embed_tokens|lm_head", verbose=False)
    assert report.groups["lm_head"][0] == 0 and report.groups["model.embed_tokens"][0] == 0

    report = unfreeze(model, kind="ffn", layers=[1], verbose=False)
    assert model.model.layers[1].mlp.down_proj.weight.requires_grad
    assert not model.model.layers[1].self_attn.q_proj.weight.requires_grad
    report = unfreeze(model, verbose=False)
    assert report.trainable == report.total == total
    assert str(report).startswith(f"trainable parameters: {total:,} / {total:,}")


def test_nothing_selected_is_an_error():
    with pytest.raises(ValueError, match="no parameter matches"):
        freeze(tiny_hf_model("llama"), r"does_not_exist", verbose=False)


OPTIMIZERS = {
    "adamw+wd": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adam+l2": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),
    "sgd+momentum+wd": lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9, weight_decay=0.1),
}


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_frozen_expert_rows_are_bit_identical_under_optimizers(opt):
    model = tiny_hf_model("mixtral")
    report = freeze(model, kind="ffn", experts=[0, 2], verbose=False)
    experts = model.model.layers[0].mlp.experts
    router = model.model.layers[0].mlp.gate
    assert frozen_rows(experts.gate_up_proj).tolist() == [True, False, True, False]
    assert report.groups["ffn"][0] < report.groups["ffn"][1]
    before = [t.detach().clone() for t in (experts.gate_up_proj, experts.down_proj, router.weight)]
    optimizer = OPTIMIZERS[opt](model.parameters())
    model.train()
    ids = tokens(2, 9, seed=2)
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        assert not experts.gate_up_proj.grad[[0, 2]].any()  # gradient rows masked
        optimizer.step()
        optimizer.zero_grad()
    for t, b in zip((experts.gate_up_proj, experts.down_proj, router.weight), before, strict=True):
        assert torch.equal(t[[0, 2]], b[[0, 2]])
        assert not torch.equal(t[[1, 3]], b[[1, 3]])
    for value in optimizer.state[experts.gate_up_proj].values():
        if isinstance(value, torch.Tensor) and value.shape == experts.gate_up_proj.shape:
            assert not value[[0, 2]].any()  # optimizer state of frozen rows kept at zero

    unfreeze(model, kind="ffn", experts=[2], verbose=False)
    assert frozen_rows(experts.gate_up_proj).tolist() == [True, False, False, False]


def test_masking_gradients_alone_would_not_keep_rows_frozen():
    """Why the optimizer step is masked too: AdamW's decoupled decay moves rows whose gradient is zero."""
    p = torch.nn.Parameter(torch.ones(2, 3))
    opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1)
    p.grad = torch.tensor([[0.0] * 3, [1.0] * 3])  # row 0 "masked"
    opt.step()
    assert not torch.equal(p[0], torch.ones(3))


def test_report_counts_partially_frozen_rows():
    model = tiny_hf_model("qwen2_moe")
    full = trainable_report(model)
    freeze(model, kind="ffn", experts=[1], verbose=False)
    part = trainable_report(model)
    per_expert = sum(
        t[1].numel()
        for b in model.model.layers
        for t in (b.mlp.experts.gate_up_proj, b.mlp.experts.down_proj, b.mlp.gate.weight)
    )
    assert full.trainable - part.trainable == per_expert
