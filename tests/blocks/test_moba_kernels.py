"""MoBA kernels: the block-sparse path against the dense reference (outputs and gradients), exact cases, masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from utils import assert_close, max_abs_diff

from myllm.blocks.attention.moba_kernels import BlockSums, moba_attention, piece_attention, piece_attention_backward
from myllm.blocks.attention.moba_reference import moba_mask, moba_reference, query_intervals


def _qkv(bsz, n_heads, n_kv, q_len, kv_len, head_dim, *, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, n_heads, q_len, head_dim, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(bsz, n_kv, kv_len, head_dim, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(bsz, n_kv, kv_len, head_dim, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


def _outputs_and_grads(fn, q, k, v, seed=1):
    out = fn(q, k, v)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def _assert_same(fn_a, fn_b, q, k, v, atol=1e-5):
    for a, b in zip(_outputs_and_grads(fn_a, q, k, v), _outputs_and_grads(fn_b, q, k, v), strict=True):
        assert_close(a, b, atol=atol)


def padded_causal_mask(pads: list[int], q_len: int, kv_len: int, *, right: bool = False) -> torch.Tensor:
    """Bool ``[B, 1, Tq, Tk]`` mask of left- (or right-) padded rows; queries are the last ``Tq`` positions."""
    pos = torch.arange(kv_len)
    q_pos = torch.arange(kv_len - q_len, kv_len)
    causal = q_pos[:, None] >= pos[None, :]
    pads_t = torch.tensor(pads)[:, None]
    real = pos[None, :] < kv_len - pads_t if right else pos[None, :] >= pads_t
    return (causal[None] & real[:, None, :])[:, None]


def packed_mask(lengths: list[int]) -> torch.Tensor:
    """Bool ``[1, 1, T, T]`` block-diagonal causal mask of documents packed in one row."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(len(doc))
    return ((doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :]))[None, None]


def _moba(mask=None, **kw):
    return lambda q, k, v: moba_attention(q, k, v, mask, **kw)


def _ref(mask=None, **kw):
    return lambda q, k, v: moba_reference(q, k, v, mask, **kw)


@pytest.mark.parametrize(
    "bsz, n_heads, n_kv, length, head_dim, chunk, top_k",
    [
        (1, 2, 2, 37, 8, 5, 3),
        (2, 4, 2, 37, 8, 5, 3),
        (2, 6, 2, 63, 12, 8, 2),
        (1, 4, 1, 40, 8, 4, 1),
        (2, 2, 1, 33, 4, 3, 20),
    ],
    ids=["mha", "gqa", "gqa3-odd", "mqa-topk1", "topk-covers-all"],
)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_sparse_matches_reference(bsz, n_heads, n_kv, length, head_dim, chunk, top_k, fused):
    q, k, v = _qkv(bsz, n_heads, n_kv, length, length, head_dim)
    _assert_same(_moba(chunk_size=chunk, top_k=top_k, fused=fused), _ref(chunk_size=chunk, top_k=top_k), q, k, v)


@st.composite
def _cases(draw):
    n_kv = draw(st.integers(1, 2))
    n_heads = n_kv * draw(st.integers(1, 3))
    bsz = draw(st.integers(1, 3))
    kv_len = draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["none", "left", "right", "packed", "decode", "chunked"]))
    q_len = kv_len
    if kind in ("decode", "chunked"):
        q_len = 1 if kind == "decode" else draw(st.integers(1, kv_len))
        pads = [draw(st.integers(0, kv_len - q_len)) for _ in range(bsz)]
        mask = padded_causal_mask(pads, q_len, kv_len)
    elif kind in ("left", "right"):
        pads = [draw(st.integers(0, kv_len - 1)) for _ in range(bsz)]
        mask = padded_causal_mask(pads, q_len, kv_len, right=kind == "right")
    elif kind == "packed":
        bsz, cuts = 1, sorted(set(draw(st.lists(st.integers(1, kv_len - 1), max_size=4)) if kv_len > 1 else []))
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, kv_len], strict=True)]
        mask = packed_mask(lengths)
    else:
        mask = None
    if mask is not None and draw(st.booleans()):  # the additive float form transformers' eager path builds
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return {
        "shape": (bsz, n_heads, n_kv, q_len, kv_len, draw(st.sampled_from([4, 8]))),
        "mask": mask,
        "chunk": draw(st.integers(1, 9)),
        "top_k": draw(st.integers(1, 5)),
        "fused": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=60, deadline=None)
@given(case=_cases())
def test_property_sparse_equals_reference_over_lengths_chunks_and_masks(case):
    q, k, v = _qkv(*case["shape"], seed=case["seed"])
    kw = {"chunk_size": case["chunk"], "top_k": case["top_k"]}
    _assert_same(_moba(case["mask"], fused=case["fused"], **kw), _ref(case["mask"], **kw), q, k, v)


def _dense_causal(mask=None, scaling=None):
    def fn(q, k, v):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
        return out.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # rows without keys: zeros, as MoBA gives

    return fn


@pytest.mark.parametrize("length, chunk, top_k", [(64, 16, 4), (61, 8, 8), (50, 64, 1), (33, 4, 9)])
def test_moba_equals_full_attention_when_blocks_cover_the_sequence(length, chunk, top_k):
    q, k, v = _qkv(2, 4, 2, length, length, 8)
    _assert_same(_moba(chunk_size=chunk, top_k=top_k), _dense_causal(), q, k, v)


def test_small_top_k_differs_from_full_attention():
    """Non-vacuity of the test above: with few blocks MoBA really is sparse."""
    q, k, v = _qkv(2, 4, 2, 64, 64, 8)
    assert max_abs_diff(moba_attention(q, k, v, chunk_size=16, top_k=2), _dense_causal()(q, k, v)) > 1e-2


def test_full_coverage_with_padding_and_scaling_equals_masked_attention():
    q, k, v = _qkv(3, 4, 2, 40, 40, 8)
    mask = padded_causal_mask([0, 7, 19], 40, 40)
    _assert_same(_moba(mask, chunk_size=8, top_k=5, scaling=0.3), _dense_causal(mask, scaling=0.3), q, k, v)


def test_scaling_is_honoured():
    q, k, v = _qkv(1, 2, 2, 24, 24, 8)
    default = moba_attention(q, k, v, chunk_size=4, top_k=2)
    scaled = moba_attention(q, k, v, chunk_size=4, top_k=2, scaling=0.5)
    assert max_abs_diff(default, scaled) > 1e-3
    assert_close(scaled, moba_reference(q, k, v, chunk_size=4, top_k=2, scaling=0.5))
    # scaling s on q equals scaling 1/sqrt(D) on q * s * sqrt(D): the gate sees the same ranking
    assert_close(scaled, moba_attention(q * 0.5 * 8**0.5, k, v, chunk_size=4, top_k=2), atol=1e-5)


def test_gqa_equals_mha_with_repeated_keys():
    q, k, v = _qkv(2, 6, 2, 30, 30, 8)
    rep = [x.detach().repeat_interleave(3, 1) for x in (k, v)]
    assert_close(moba_attention(q, k, v, chunk_size=4, top_k=3), moba_attention(q, *rep, chunk_size=4, top_k=3))


def test_top_k_one_is_block_local_causal_attention():
    q, k, v = _qkv(2, 4, 2, 30, 30, 8)
    block = torch.arange(30) // 7
    local = (block[:, None] == block[None, :]) & (torch.arange(30)[:, None] >= torch.arange(30)[None, :])
    _assert_same(_moba(chunk_size=7, top_k=1), _dense_causal(local[None, None]), q, k, v)


def test_left_padding_gives_the_unpadded_result():
    """Blocks are counted from each sequence's first real token, so padding changes nothing."""
    q, k, v = _qkv(1, 4, 2, 23, 23, 8)
    alone = moba_attention(q, k, v, chunk_size=4, top_k=2)
    pad = 9
    qp, kp, vp = (F.pad(x.detach(), (0, 0, pad, 0)) for x in (q, k, v))
    padded = moba_attention(qp, kp, vp, padded_causal_mask([pad], 23 + pad, 23 + pad), chunk_size=4, top_k=2)
    assert_close(padded[:, :, pad:], alone)
    assert padded[:, :, :pad].abs().max() == 0


def test_packed_documents_equal_separate_runs():
    q, k, v = _qkv(1, 2, 1, 30, 30, 8)
    packed = moba_attention(q, k, v, packed_mask([7, 13, 10]), chunk_size=3, top_k=2)
    for a, b in [(0, 7), (7, 20), (20, 30)]:
        alone = moba_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], chunk_size=3, top_k=2)
        assert_close(packed[:, :, a:b], alone)


def test_decode_step_selects_blocks_sparsely():
    """A decode query ignores unselected past blocks: changing them leaves the output unchanged."""
    q, k, v = _qkv(1, 2, 2, 1, 64, 8)
    out = moba_attention(q, k, v, chunk_size=8, top_k=2)
    allowed = moba_mask(
        q, k, query_intervals(None, batch=1, q_len=1, kv_len=64, device=q.device), chunk_size=8, top_k=2
    )
    assert int(allowed.sum()) == 2 * 2 * 8  # two blocks per head
    unused = ~allowed.any(1)[0, 0]  # keys no head attends
    v2 = v.detach().clone()
    v2[:, :, unused] += 100.0
    assert_close(moba_attention(q, k, v2, chunk_size=8, top_k=2), out)
    assert max_abs_diff(_dense_causal()(q, k, v2), _dense_causal()(q, k, v)) > 1.0


def test_block_sum_memo_follows_a_growing_and_a_reordered_cache():
    memo = BlockSums()
    q, k, v = _qkv(2, 4, 2, 1, 60, 8)
    mask = padded_causal_mask([0, 7], 1, 60)
    for length in (30, 31, 45, 60):  # decoding steps over a growing cache, reusing the memo
        kw = {"chunk_size": 4, "top_k": 3}
        m = mask[..., :length]
        fresh = moba_reference(q, k[:, :, :length], v[:, :, :length], m, **kw)
        assert_close(moba_attention(q, k[:, :, :length], v[:, :, :length], m, block_sums=memo, **kw), fresh)
    flipped = [x.detach().flip(0) for x in (q, k, v)]  # a reordered batch (beam search): the memo must notice
    expected = moba_reference(*flipped, mask.flip(0), chunk_size=4, top_k=3)
    assert_close(moba_attention(*flipped, mask.flip(0), chunk_size=4, top_k=3, block_sums=memo), expected)


@pytest.mark.parametrize("causal, masked", [(False, False), (True, False), (False, True)])
def test_fused_pieces_match_plain_pieces(causal, masked):
    q, k, v = _qkv(2, 3, 3, 9, 9, 8)
    mask = None
    if masked:
        keep = torch.rand(9, 9, generator=torch.Generator().manual_seed(3)) > 0.4
        keep[:, 0] = True
        mask = torch.zeros(9, 9).masked_fill(~keep, float("-inf"))
    kw = {"scale": 0.4, "causal": causal, "mask": mask}
    (o1, l1), (o2, l2) = (piece_attention(q, k, v, fused=f, **kw) for f in (True, False))
    assert_close(o1, o2)
    assert_close(l1, l2)
    g = torch.randn(o1.shape)
    for a, b in zip(
        piece_attention_backward(g, q, k, v, o1, l1, fused=True, **kw),
        piece_attention_backward(g, q, k, v, o1, l1, fused=False, **kw),
        strict=True,
    ):
        assert_close(a, b)


def test_bad_settings_and_masks_raise_clear_errors():
    q, k, v = _qkv(1, 2, 2, 10, 10, 4)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        moba_attention(q, k, v, chunk_size=0, top_k=2)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        moba_attention(q, k, v, chunk_size=2, top_k=0)
    with pytest.raises(ValueError, match="divisible"):
        moba_attention(
            q, k[:, :1].expand(1, 3, 10, 4).contiguous(), v[:, :1].expand(1, 3, 10, 4), chunk_size=2, top_k=2
        )
    gappy = torch.ones(1, 1, 10, 10, dtype=torch.bool).tril()
    gappy[0, 0, 9, 4] = False
    with pytest.raises(ValueError, match="contiguous run"):
        moba_attention(q, k, v, gappy, chunk_size=2, top_k=2)
    window = torch.ones(10, 10, dtype=torch.bool).tril() & torch.ones(10, 10, dtype=torch.bool).triu(-3)
    with pytest.raises(ValueError, match="sliding-window"):
        moba_attention(q, k, v, window[None, None], chunk_size=2, top_k=2)
    with pytest.raises(ValueError, match="4-D"):
        moba_attention(q, k, v, torch.ones(10, 10, dtype=torch.bool), chunk_size=2, top_k=2)
