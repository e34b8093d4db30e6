"""The ``moba`` attention block: registry settings, sparse kernel against the reference kernel, bad settings."""

from __future__ import annotations

import pydantic
import pytest
import torch
from utils import assert_close

from myllm import blocks


def _pair(**kw):
    base = {"hidden_size": 48, "num_heads": 6, "num_kv_heads": 2, "chunk_size": 5, "top_k": 3, **kw}
    sparse = blocks.build("attention", "moba", **base)
    reference = blocks.build("attention", "moba", kernel="reference", **base)
    reference.load_state_dict(sparse.state_dict())
    return sparse, reference


@pytest.mark.parametrize("kw", [{}, {"qkv_bias": True, "qk_norm": True, "scaling": 0.2}], ids=["plain", "qwen-like"])
def test_block_sparse_kernel_matches_reference_kernel_with_parameter_gradients(kw):
    sparse, reference = _pair(**kw)
    x = torch.randn(2, 33, 48)
    mask = torch.ones(2, 1, 33, 33, dtype=torch.bool).tril()
    mask[1, ..., :6] = False  # left padding in row 1
    outs = []
    for block in (sparse, reference):
        block.zero_grad()
        out = block(x, attention_mask=mask)[0]
        out.pow(2).sum().backward()
        outs.append((out, {n: p.grad.clone() for n, p in block.named_parameters()}))
    assert_close(outs[0][0], outs[1][0])
    for name, grad in outs[0][1].items():
        assert_close(grad, outs[1][1][name], atol=1e-4)


def test_settings_live_on_the_module():
    a = blocks.build("attention", "moba", hidden_size=16, num_heads=2, chunk_size=3, top_k=2)
    b = blocks.build("attention", "moba", hidden_size=16, num_heads=2, chunk_size=7, top_k=4)
    assert (a.chunk_size, a.top_k, b.chunk_size, b.top_k) == (3, 2, 7, 4)
    assert "chunk_size=3" in repr(a)
    assert (b.block_kwargs["chunk_size"], b.block_kwargs["top_k"]) == (7, 4)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"top_k": 0}, "top_k"),
        ({"sliding_window": 8}, "sliding_window"),  # no GQA block has one; MoBA would not follow it either
        ({"dropout": 0.1}, "dropout"),
        ({"kernel": "flash"}, "kernel"),
    ],
)
def test_bad_settings_are_rejected(kw, match):
    base = {"hidden_size": 16, "num_heads": 2, "chunk_size": 4, "top_k": 2, **kw}
    with pytest.raises(pydantic.ValidationError, match=match):
        blocks.build("attention", "moba", **base)
    with pytest.raises(pydantic.ValidationError, match=match):
        blocks.get("attention", "moba").builder(**base)  # the class validates when built directly too
