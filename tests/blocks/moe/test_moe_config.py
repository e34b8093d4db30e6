"""Bad keyword arguments are rejected with a clear pydantic error before any module is built."""

from __future__ import annotations

import pydantic
import pytest
import torch

from myllm import blocks
from myllm.blocks.ffn.moe import CoE, MoE

OK = {"hidden_size": 16, "n_experts": 8, "top_k": 2, "intermediate_size": 8}

BAD = [
    ({"top_k": 9}, "top_k \\(9\\) must be <= n_experts"),
    ({"top_k": 0}, "top_k"),
    ({"n_group": 3}, "n_group \\(3\\) must divide n_experts"),
    ({"n_group": 2, "topk_group": 3}, "topk_group \\(3\\) must be <= n_group"),
    ({"n_group": 4, "topk_group": 1, "top_k": 3}, "exceeds the experts in the 1 selected groups"),
    ({"balance": {"switch": -0.1}}, "balance.switch"),
    ({"balance": {"z_loss": 0.1, "aux": 0.1}}, "balance.aux"),
    ({"temperature": 0.0}, "temperature"),
    ({"jitter": 1.5}, "jitter must be in"),
    ({"score_func": "relu"}, "score_func"),
    ({"act": "swishy"}, "unknown activation"),
    ({"shared_gate": True}, "needs n_shared_experts"),
    ({"experts_impl": "fast"}, "experts_impl"),
    ({"n_expert": 8}, "n_expert"),
]


@pytest.mark.parametrize("name", ["moe", "coe"])
@pytest.mark.parametrize("bad, message", BAD, ids=[next(iter(b)) + str(i) for i, (b, _) in enumerate(BAD)])
def test_bad_kwargs_raise_validation_errors(name, bad, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        blocks.validate("ffn", name, **{**OK, **bad})


@pytest.mark.parametrize("iterations", [0, -1])
def test_coe_needs_an_iteration(iterations):
    with pytest.raises(pydantic.ValidationError, match="n_iterations >= 1"):
        blocks.build("ffn", "coe", **OK, n_iterations=iterations)


@pytest.mark.parametrize("cls", [MoE, CoE])
def test_direct_construction_validates_before_building(cls, monkeypatch):
    built = []
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda self, *a, **k: built.append(self))
    with pytest.raises(pydantic.ValidationError, match="top_k"):
        cls(**{**OK, "top_k": 9})
    assert built == []  # nothing was constructed


def test_valid_kwargs_build():
    m = blocks.build("ffn", "moe", **OK, n_group=4, topk_group=2, score_func="sigmoid", balance={"loss_free": 1e-3})
    assert m.gate.e_score_correction_bias is not None
    assert blocks.build("ffn", "coe", **OK, n_iterations=3).n_iterations == 3
