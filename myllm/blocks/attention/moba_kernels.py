"""MoBA's efficient path: block-sparse attention whose memory grows with ``T * H * D``, never with ``T^2``.

It computes exactly what :func:`myllm.blocks.attention.moba_reference.moba_reference` computes (the algorithm
is documented there), outputs and gradients, without forming a ``Tq x Tk`` matrix:

1. **Plan** (no grad): per batch row, the sequences of the row (from the mask), their blocks, the block
   mean keys and the gate; per query the own block and the ``top_k - 1`` selected past blocks.
2. **Own blocks**: causal attention of every query over its own block. Full blocks of a prefill run are
   fused calls over strided views (no copies); partial blocks and chunked prefill get a call per block
   with an explicit mask.
3. **Routed blocks**: per past block, one call for every (query head, query) row that selected it, all key/
   value heads at once (rows padded per kv head), over the block's ``c`` keys, which are a view of ``key``.
   GQA is never materialised: query heads of a group simply contribute rows.
4. **Merge** the partial outputs by their log-sum-exp. The backward pass recomputes each piece from the saved
   merged output and log-sum-exp (flash-attention style), so the pieces' gradients add up to the exact
   gradient of the whole softmax.

Scratch memory per call is bounded (``_SCRATCH_BYTES``), so the forward peak is the output, its log-sum-exp,
the per-query selection (int16) and a constant. Single-query calls (decoding) take the path of
:mod:`.moba_decode`. Pieces run through PyTorch's fused flash-attention CPU kernel (``fused=True``, the
default on CPU) or through plain matmul code (:func:`piece_attention` with ``fused=False``, used on other
devices and compared against the fused kernel in tests). Work is ``T * top_k * c * D`` per head instead of
``T^2 * D / 2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from myllm.blocks.attention.moba_decode import GATE_SLAB_ELEMENTS, BlockSums, block_sums, decode_attention
from myllm.blocks.attention.moba_reference import (
    GATE_DTYPE,
    QueryIntervals,
    accumulation_dtype,
    check_moba_inputs,
    query_intervals,
)

_SCRATCH_BYTES = 1 << 20  # bytes of the pieces of one call


# ----------------------------------------------------------------------------------------------------------
# attention over one piece of keys, returning the log-sum-exp (fused CPU kernel or plain math)
# ----------------------------------------------------------------------------------------------------------


def piece_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q [N, h, n, D]`` over ``k``/``v [N, h, L, D]`` -> ``(out [N, h, n, D], lse [N, h, n])``.

    ``causal``: row ``r`` sees keys ``0..r`` (top-left). ``mask``: additive float ``[n, L]`` (0 / -inf). Every
    row must see at least one key.
    """
    if fused:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale
        )
    scores = _piece_scores(q, k, scale, causal, mask)
    lse = scores.logsumexp(-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]).to(v.dtype), v)
    return out, lse


def piece_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of one piece, given the *merged* ``out``/``lse`` of all pieces a row attends.

    With the merged statistics the probabilities ``exp(s - lse)`` and ``rowsum(dO * O)`` are those of the
    whole softmax, so the piece gradients sum to the gradients of the full attention.
    """
    if fused:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale
        )
    probs = torch.exp(_piece_scores(q, k, scale, causal, mask) - lse[..., None])  # (N, h, n, L)
    grad_out = grad_out.to(probs.dtype)
    dv = torch.matmul(probs.transpose(-1, -2), grad_out)
    dp = torch.matmul(grad_out, v.to(probs.dtype).transpose(-1, -2))
    ds = probs * (dp - (grad_out * out.to(probs.dtype)).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k.to(probs.dtype)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(probs.dtype)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _piece_scores(q, k, scale, causal, mask):
    dtype = accumulation_dtype(q.dtype)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale  # (N, h, n, L)
    if causal:
        n, length = scores.shape[-2:]
        above = torch.ones(n, length, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    if mask is not None:
        scores = scores + mask.to(dtype)
    return scores


# ----------------------------------------------------------------------------------------------------------
# the plan: which queries meet which keys
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _OwnRun:
    """``n_blocks`` consecutive full blocks: query ``q_start + j c + r`` sees keys ``key_start + j c + (0..r)``."""

    q_start: int
    key_start: int
    n_blocks: int
    block: int


@dataclass
class _OwnGroup:
    """Queries (all heads) whose own block starts at ``key_start``; they see at most ``key_len`` of its keys."""

    queries: slice | torch.Tensor  # positions in Tq
    key_start: int
    key_len: int
    causal: bool  # query r of the group sees keys key_start .. key_start + r
    mask: torch.Tensor | None  # additive [n, key_len]; None when causal or when every query sees every key


@dataclass
class _RowPlan:
    runs: list[_OwnRun] = field(default_factory=list)
    own: list[_OwnGroup] = field(default_factory=list)
    # routing: selected past blocks of every (query head, query) ``[H, Tq, top_k - 1]`` (-1: none), the start of
    # every block of the row, and the blocks selected at least once
    selected: torch.Tensor | None = None
    block_start: list[int] = field(default_factory=list)
    routed_blocks: list[int] = field(default_factory=list)


@dataclass
class _Plan:
    chunk_size: int
    rows: list[_RowPlan]


def _plan(query: torch.Tensor, key: torch.Tensor, intervals: QueryIntervals, chunk_size: int, top_k: int) -> _Plan:
    """Sequences, blocks and the gate of every batch row (runs without grad)."""
    c = chunk_size
    device = query.device
    plan = _Plan(c, [])
    for b in range(query.shape[0]):
        row = _RowPlan()
        plan.rows.append(row)
        q_idx = intervals.valid[b].nonzero().squeeze(1)
        if q_idx.numel() == 0:
            continue
        start, end = intervals.start[b, q_idx], intervals.end[b, q_idx]
        seg_start, seg_of = torch.unique(start, sorted=True, return_inverse=True)
        seg_end = torch.full_like(seg_start, -1).scatter_reduce(0, seg_of, end, "amax")
        if bool((seg_start[1:] <= seg_end[:-1]).any()):
            raise ValueError(
                "MoBA needs the key ranges of different sequences in a row to be disjoint (causal masks with "
                "padding or packed sequences); got overlapping ranges, e.g. from a sliding-window mask"
            )
        n_chunks = torch.div(seg_end - seg_start, c, rounding_mode="floor") + 1
        first_chunk = n_chunks.cumsum(0) - n_chunks
        total = int(n_chunks.sum())
        chunk_seg = torch.repeat_interleave(torch.arange(len(seg_start), device=device), n_chunks)
        chunk_start = seg_start[chunk_seg] + (torch.arange(total, device=device) - first_chunk[chunk_seg]) * c
        chunk_full = seg_end[chunk_seg] + 1 - chunk_start >= c
        lo = first_chunk[seg_of]  # first block of each query's sequence
        own = lo + torch.div(end - start, c, rounding_mode="floor")  # (n,)
        _plan_own(row, q_idx, end, own, chunk_start.tolist(), c)
        if top_k > 1 and bool((own > lo).any()):
            _plan_routed(row, query[b], key[b], q_idx, lo, own, chunk_start, chunk_full, c, top_k)
    return plan


def _plan_own(row: _RowPlan, q_idx, end, own, chunk_start: list[int], c: int) -> None:
    order = torch.argsort(own, stable=True)
    chunks, counts = torch.unique_consecutive(own[order], return_counts=True)
    sizes = counts.tolist()
    for m, qs, es in zip(chunks.tolist(), q_idx[order].split(sizes), end[order].split(sizes), strict=True):
        ks = chunk_start[m]
        rel_end = es - ks  # last key of each query, relative to the block start
        key_len = int(rel_end.max()) + 1
        n, first = len(qs), int(qs[0])
        steps = torch.arange(n, device=qs.device)
        contiguous = bool((qs == first + steps).all())
        causal = n == key_len and bool((rel_end == steps).all())
        if contiguous and causal and n == c:
            last = row.runs[-1] if row.runs else None
            if last and last.key_start + last.n_blocks * c == ks and last.q_start + last.n_blocks * c == first:
                last.n_blocks += 1
            else:
                row.runs.append(_OwnRun(first, ks, 1, c))
            continue
        queries: slice | torch.Tensor = slice(first, first + n) if contiguous else qs
        if causal:
            row.own.append(_OwnGroup(queries, ks, key_len, True, None))
        elif bool((rel_end == key_len - 1).all()):
            row.own.append(_OwnGroup(queries, ks, key_len, False, None))
        else:
            allowed = torch.arange(key_len, device=qs.device)[None, :] <= rel_end[:, None]
            mask = torch.zeros(allowed.shape, device=qs.device).masked_fill(~allowed, float("-inf"))
            row.own.append(_OwnGroup(queries, ks, key_len, False, mask))


def _plan_routed(row: _RowPlan, query, key, q_idx, lo, own, chunk_start, chunk_full, c: int, top_k: int) -> None:
    """Gate and select past blocks for ``query [H, Tq, D]`` over ``key [Hk, Tk, D]`` (runs without grad)."""
    n_heads, q_len, head_dim = query.shape
    n_kv = key.shape[0]
    groups = n_heads // n_kv
    total = len(chunk_start)
    device = query.device
    has_past = (own > lo).nonzero().squeeze(1)
    q_idx, lo, own = q_idx[has_past], lo[has_past], own[has_past]
    kmean = torch.zeros(n_kv, total, head_dim, dtype=GATE_DTYPE, device=device)  # mean key of each full block
    starts = chunk_start.tolist()
    runs: list[list[int]] = []  # consecutive full blocks of one sequence: [first block, count]
    for m in chunk_full.nonzero().squeeze(1).tolist():
        if runs and runs[-1][0] + runs[-1][1] == m and starts[m] == starts[m - 1] + c:
            runs[-1][1] += 1
        else:
            runs.append([m, 1])
    for m, n in runs:
        kmean[:, m : m + n] = block_sums(key, starts[m], n, c) / c
    k_past = min(top_k - 1, total)
    index_dtype = torch.int16 if total < 2**15 else torch.int32
    selected = torch.full((n_heads, q_len, k_past), -1, dtype=index_dtype, device=device)
    blocks = torch.arange(total, device=device)
    slab = max(1, GATE_SLAB_ELEMENTS // (n_heads * max(total, head_dim)))  # bounds the float64 q copy and gate
    for s0 in range(0, len(q_idx), slab):
        qs, los, owns = q_idx[s0 : s0 + slab], lo[s0 : s0 + slab], own[s0 : s0 + slab]
        n = len(qs)
        q = query[:, qs].to(GATE_DTYPE).reshape(n_kv, groups * n, head_dim)  # (Hk, G*n, D)
        gate = torch.matmul(q, kmean.transpose(1, 2)).view(n_heads, n, total)
        candidate = (blocks[None, :] >= los[:, None]) & (blocks[None, :] < owns[:, None])  # past blocks (n, blocks)
        gate.masked_fill_(~candidate, float("-inf"))
        values, picked = gate.topk(k_past, dim=-1)  # (H, n, k_past)
        selected[:, qs] = picked.masked_fill_(values == float("-inf"), -1).to(index_dtype)
    row.selected = selected
    row.block_start = chunk_start.tolist()
    row.routed_blocks = [m for m in torch.unique(selected).tolist() if m >= 0]


def _routed_calls(row: _RowPlan, m: int, n_kv: int, max_rows: int):
    """The calls for block ``m``: ``(rows [Hk, R], pad [Hk, R], where [n], idx [n])``.

    ``rows`` index ``query[b]`` as ``[H * Tq]`` (padding entries point at row 0), ``pad`` marks padding,
    ``where`` are the flat positions of the real entries and ``idx`` their rows. Row lists are derived from
    ``row.selected`` on the fly (forward and backward), so no per-pair tables stay in memory; rows of each kv
    head are left-aligned and padded to the longest.
    """
    n_heads, q_len = row.selected.shape[:2]
    heads, queries, _ = (row.selected == m).nonzero(as_tuple=True)  # sorted by head, hence by kv head
    kv_head = torch.div(heads, n_heads // n_kv, rounding_mode="floor")
    counts = torch.bincount(kv_head, minlength=n_kv)
    slot = torch.arange(len(heads), device=heads.device) - (counts.cumsum(0) - counts)[kv_head]
    flat = heads * q_len + queries
    n_rows = int(counts.max())
    for r0 in range(0, n_rows, max_rows):
        width = min(max_rows, n_rows - r0)
        sel = (slot >= r0) & (slot < r0 + width)
        rows = torch.zeros(n_kv, width, dtype=torch.long, device=heads.device)
        pad = torch.ones(n_kv, width, dtype=torch.bool, device=heads.device)
        where = kv_head[sel] * width + slot[sel] - r0
        idx = flat[sel]
        rows.view(-1)[where] = idx
        pad.view(-1)[where] = False
        yield rows, pad, where, idx


# ----------------------------------------------------------------------------------------------------------
# execution
# ----------------------------------------------------------------------------------------------------------


def _run_view(x: torch.Tensor, start: int, n_blocks: int, c: int) -> torch.Tensor:
    """``x [h, T, D]`` -> blocks ``[n_blocks, h, c, D]`` starting at ``start`` (a strided view, no copy)."""
    return x[:, start : start + n_blocks * c].unflatten(1, (n_blocks, c)).transpose(0, 1)


def _unrun(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_run_view`: ``[n_blocks, h, c, ...] -> [h, n_blocks * c, ...]``."""
    return x.transpose(0, 1).flatten(1, 2)


def _pieces(run: _OwnRun, per_call: int):
    """Split a run into runs of at most ``per_call`` blocks (bounds the scratch of one call)."""
    for j in range(0, run.n_blocks, per_call):
        n = min(per_call, run.n_blocks - j)
        yield run.q_start + j * run.block, run.key_start + j * run.block, n


def _budget(n_kv: int, c: int, head_dim: int, element: int) -> tuple[int, int]:
    """Blocks per own-run call and rows per kv head per routed call, within ``_SCRATCH_BYTES``."""
    blocks = max(1, _SCRATCH_BYTES // (n_kv * c * head_dim * element))
    rows = max(16, _SCRATCH_BYTES // (3 * n_kv * head_dim * element))
    return blocks, rows


class _MobaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, plan: _Plan, scale: float, fused: bool):  # noqa: D102
        out, lse = _moba_forward(query, key, value, plan, scale, fused)
        out = out.to(query.dtype)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.plan, ctx.scale, ctx.fused = plan, scale, fused
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        query, key, value, out, lse = ctx.saved_tensors
        dq, dk, dv = _moba_backward(grad_out, query, key, value, out, lse, ctx.plan, ctx.scale, ctx.fused)
        return dq, dk, dv, None, None, None


def _moba_forward(query, key, value, plan: _Plan, scale: float, fused: bool):
    bsz, n_heads, q_len, head_dim = query.shape
    n_kv = key.shape[1]
    groups, c = n_heads // n_kv, plan.chunk_size
    acc = accumulation_dtype(query.dtype)
    per_call, max_rows = _budget(n_kv, c, head_dim, query.element_size())
    out = torch.zeros(bsz, n_heads, q_len, head_dim, dtype=acc, device=query.device)
    lse = torch.full((bsz, n_heads, q_len), float("-inf"), dtype=acc, device=query.device)
    for b, row in enumerate(plan.rows):
        q_b = query[b].view(n_kv, groups, q_len, head_dim)
        out_b, lse_b = out[b].view(n_kv, groups, q_len, head_dim), lse[b].view(n_kv, groups, q_len)
        for run in row.runs:
            for q0, k0, n in _pieces(run, per_call):
                k, v = _run_view(key[b], k0, n, c), _run_view(value[b], k0, n, c)
                span = slice(q0, q0 + n * c)
                for g in range(groups):
                    o, s = piece_attention(_run_view(q_b[:, g], q0, n, c), k, v, scale=scale, causal=True, fused=fused)
                    out_b[:, g, span] = _unrun(o)
                    lse_b[:, g, span] = _unrun(s)
        for grp in row.own:
            keys = slice(grp.key_start, grp.key_start + grp.key_len)
            k, v = key[b, :, keys][None], value[b, :, keys][None]  # (1, Hk, L, D)
            for g in range(groups):
                q = q_b[:, g, grp.queries][None]
                o, s = piece_attention(q, k, v, scale=scale, causal=grp.causal, mask=grp.mask, fused=fused)
                out_b[:, g, grp.queries] = o[0].to(acc)
                lse_b[:, g, grp.queries] = s[0].to(acc)
        if not row.routed_blocks:
            continue
        q_flat = query[b].reshape(n_heads * q_len, head_dim)
        out_flat, lse_flat = out[b].view(-1, head_dim), lse[b].view(-1)
        for m in row.routed_blocks:
            keys = slice(row.block_start[m], row.block_start[m] + c)
            k, v = key[b, :, keys][None], value[b, :, keys][None]
            for rows, _, where, idx in _routed_calls(row, m, n_kv, max_rows):
                q = q_flat.index_select(0, rows.flatten()).view(1, *rows.shape, head_dim)  # padding: any row
                o, s = piece_attention(q, k, v, scale=scale, fused=fused)
                o = o.reshape(-1, head_dim).index_select(0, where).to(acc)  # real rows only
                s = s.reshape(-1).index_select(0, where).to(acc)
                new = torch.logaddexp(lse_flat.index_select(0, idx), s)
                # out <- out * exp(old - new) + o * exp(s - new), and the two weights sum to one
                merged = torch.lerp(out_flat.index_select(0, idx), o, torch.exp(s - new)[:, None])
                out_flat.index_copy_(0, idx, merged)
                lse_flat.index_copy_(0, idx, new)
    return out, lse


def _moba_backward(grad_out, query, key, value, out, lse, plan: _Plan, scale: float, fused: bool):
    n_heads, q_len, head_dim = query.shape[1:]
    n_kv = key.shape[1]
    groups, c = n_heads // n_kv, plan.chunk_size
    acc = accumulation_dtype(query.dtype)
    per_call, max_rows = _budget(n_kv, c, head_dim, query.element_size())
    dq = torch.zeros(query.shape, dtype=acc, device=query.device)
    dk = torch.zeros(key.shape, dtype=acc, device=key.device)
    dv = torch.zeros(value.shape, dtype=acc, device=value.device)
    grad_out = grad_out.to(query.dtype)
    for b, row in enumerate(plan.rows):

        def per_kv(x: torch.Tensor) -> torch.Tensor:
            return x[b].view(n_kv, groups, q_len, *x.shape[3:])  # noqa: B023

        q_b, g_b, o_b, l_b, dq_b = per_kv(query), per_kv(grad_out), per_kv(out), per_kv(lse), per_kv(dq)
        for run in row.runs:
            for q0, k0, n in _pieces(run, per_call):
                keys, span = slice(k0, k0 + n * c), slice(q0, q0 + n * c)
                k, v = _run_view(key[b], k0, n, c), _run_view(value[b], k0, n, c)
                for g in range(groups):
                    lse_blocks = l_b[:, g, span].unflatten(1, (n, c)).transpose(0, 1).contiguous()
                    gq, gk, gv = piece_attention_backward(
                        _run_view(g_b[:, g], q0, n, c),
                        _run_view(q_b[:, g], q0, n, c),
                        k,
                        v,
                        _run_view(o_b[:, g], q0, n, c),
                        lse_blocks,
                        scale=scale,
                        causal=True,
                        fused=fused,
                    )
                    dq_b[:, g, span] += _unrun(gq)
                    dk[b, :, keys] += _unrun(gk)
                    dv[b, :, keys] += _unrun(gv)
        for grp in row.own:
            keys = slice(grp.key_start, grp.key_start + grp.key_len)
            k, v = key[b, :, keys][None], value[b, :, keys][None]
            for g in range(groups):
                gq, gk, gv = piece_attention_backward(
                    g_b[:, g, grp.queries][None],
                    q_b[:, g, grp.queries][None],
                    k,
                    v,
                    o_b[:, g, grp.queries][None],
                    l_b[:, g, grp.queries][None].contiguous(),
                    scale=scale,
                    causal=grp.causal,
                    mask=grp.mask,
                    fused=fused,
                )
                dq_b[:, g, grp.queries] += gq[0].to(acc)
                dk[b, :, keys] += gk[0].to(acc)
                dv[b, :, keys] += gv[0].to(acc)
        if not row.routed_blocks:
            continue
        q_flat = query[b].reshape(n_heads * q_len, head_dim)
        g_flat = grad_out[b].reshape(n_heads * q_len, head_dim)
        out_flat, lse_flat, dq_flat = out[b].reshape(-1, head_dim), lse[b].view(-1), dq[b].view(-1, head_dim)
        for m in row.routed_blocks:
            keys = slice(row.block_start[m], row.block_start[m] + c)
            k, v = key[b, :, keys][None], value[b, :, keys][None]
            for rows, pad, where, idx in _routed_calls(row, m, n_kv, max_rows):
                flat = rows.flatten()

                def gather(x: torch.Tensor) -> torch.Tensor:
                    return x.index_select(0, flat).view(1, *rows.shape, -1)  # noqa: B023

                # padding rows: zero gradient and lse = +inf (probabilities 0), so they contribute nothing
                grad_rows = gather(g_flat).masked_fill_(pad[None, ..., None], 0.0)
                lse_rows = lse_flat.index_select(0, flat).view(1, *rows.shape).masked_fill_(pad[None], math.inf)
                gq, gk, gv = piece_attention_backward(
                    grad_rows, gather(q_flat), k, v, gather(out_flat), lse_rows, scale=scale, fused=fused
                )
                dq_flat.index_add_(0, idx, gq.reshape(-1, head_dim).index_select(0, where).to(acc))
                dk[b, :, keys] += gk[0].to(acc)
                dv[b, :, keys] += gv[0].to(acc)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


def moba_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    chunk_size: int,
    top_k: int,
    scaling: float | None = None,
    fused: bool | None = None,
    block_sums: BlockSums | None = None,
) -> torch.Tensor:
    """MoBA without ``T^2`` memory: ``[B, H, Tq, D]``, equal to ``moba_reference`` (outputs and gradients).

    Args:
        query, key, value: ``[B, H, Tq, D]``, ``[B, Hk, Tk, D]``, ``[B, Hk, Tk, D]``.
        attention_mask: ``None``, 4-D bool or 4-D additive float mask (see ``query_intervals``).
        chunk_size, top_k: block size and number of blocks per query, own block included (both >= 1).
        scaling: softmax scale (default ``D ** -0.5``).
        fused: run the pieces through PyTorch's fused CPU flash-attention kernel (default: on CPU) or through
            plain matmul code.
        block_sums: a :class:`BlockSums` memo of the cache's key blocks, reused by single-query (decoding)
            calls; ``None`` recomputes them.

    Raises:
        ValueError: bad ``chunk_size``/``top_k``, mismatched shapes, or a mask MoBA cannot follow.
    """
    check_moba_inputs(query, key, value, chunk_size=chunk_size, top_k=top_k)
    bsz, _, q_len, head_dim = query.shape
    scale = head_dim**-0.5 if scaling is None else scaling
    if fused is None:
        fused = query.device.type == "cpu"
    intervals = query_intervals(attention_mask, batch=bsz, q_len=q_len, kv_len=key.shape[2], device=query.device)
    if q_len == 1:
        return decode_attention(query, key, value, intervals, chunk_size, top_k, scale, block_sums)
    with torch.no_grad():
        plan = _plan(query.detach(), key.detach(), intervals, chunk_size, top_k)
    return _MobaFunction.apply(query, key, value, plan, scale, fused)
