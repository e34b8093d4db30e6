"""MoBA decoding: one query per row, sparse over the cache, with a memo of the cache's key-block sums.

For ``query [B, H, 1, D]`` over ``key``/``value [B, Hk, Tk, D]`` the gate needs the mean key of every past
block; a step then gathers the ``top_k - 1`` selected blocks and the own block of every head and runs one
SDPA call over those ``<= top_k * c`` keys (differentiable; the gate is not). :class:`BlockSums` remembers the
float64 block sums between steps so a step does not re-read the whole cache. Same semantics as
:mod:`myllm.blocks.attention.moba_reference` (tests compare them).
"""

from __future__ import annotations

import torch

from myllm.blocks.attention.moba_reference import GATE_DTYPE, QueryIntervals

GATE_SLAB_ELEMENTS = 1 << 17  # float64 elements converted at a time (1 MiB)


def block_sums(keys: torch.Tensor, start: int, n_blocks: int, c: int) -> torch.Tensor:
    """Float64 sums of ``n_blocks`` full blocks of ``keys [Hk, Tk, D]`` from ``start``: ``[Hk, n_blocks, D]``.

    Converts at most ``GATE_SLAB_ELEMENTS`` keys' worth of elements to float64 at a time (bounded scratch).
    """
    n_kv, _, head_dim = keys.shape
    sums = torch.zeros(n_kv, n_blocks, head_dim, dtype=GATE_DTYPE, device=keys.device)
    per_copy = max(1, GATE_SLAB_ELEMENTS // (n_kv * head_dim))  # keys converted at a time
    if per_copy >= c:
        step = per_copy // c  # whole blocks at a time
        for j in range(0, n_blocks, step):
            n = min(step, n_blocks - j)
            block = keys[:, start + j * c : start + (j + n) * c].unflatten(1, (n, c))
            sums[:, j : j + n] = block.to(GATE_DTYPE).sum(2)
        return sums
    for j in range(n_blocks):
        for a in range(0, c, per_copy):
            lo = start + j * c + a
            sums[:, j] += keys[:, lo : min(lo + per_copy, start + (j + 1) * c)].to(GATE_DTYPE).sum(1)
    return sums


class BlockSums:
    """Float64 key-block sums of one cache layer, kept across decoding steps and extended as the cache grows.

    A decoding step needs the mean key of every past block; recomputing them reads the whole cache. This
    memo (one per cache layer, held by :class:`~myllm.blocks.attention.moba.MobaAttention`) sums each block
    once. Before reuse it checks the first key of every remembered block against the cache, so a cropped,
    reordered or replaced cache is recomputed rather than trusted.
    """

    def __init__(self) -> None:
        self._rows: dict[int, tuple[int, int, torch.Tensor, torch.Tensor]] = {}

    def get(self, row: int, keys: torch.Tensor, start: int, n_blocks: int, c: int) -> torch.Tensor:
        """Sums of blocks ``0 .. n_blocks - 1`` of batch row ``row`` (``keys [Hk, Tk, D]``, blocks from ``start``)."""
        sums = keys.new_zeros(keys.shape[0], 0, keys.shape[2], dtype=GATE_DTYPE)
        cached = self._rows.get(row)
        if cached is not None:
            c_start, c_size, c_sums, witness = cached
            n = c_sums.shape[1]
            firsts = start + torch.arange(n, device=keys.device) * c
            if (c_start, c_size) == (start, c) and n <= n_blocks and torch.equal(keys[:, firsts], witness):
                sums = c_sums
        done = sums.shape[1]
        if done < n_blocks:
            sums = torch.cat([sums, block_sums(keys, start + done * c, n_blocks - done, c)], dim=1)
        firsts = start + torch.arange(n_blocks, device=keys.device) * c
        self._rows[row] = (start, c, sums, keys[:, firsts].clone())
        return sums


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    intervals: QueryIntervals,
    c: int,
    top_k: int,
    scale: float,
    memo: BlockSums | None,
) -> torch.Tensor:
    """One query per row: gate over the past blocks, gather the selected and the own block, one SDPA call."""
    bsz, n_heads, _, head_dim = query.shape
    n_kv = key.shape[1]
    groups = n_heads // n_kv
    kv_index = torch.arange(n_kv, device=key.device).view(n_kv, 1, 1)
    rows = []
    for b in range(bsz):
        if not bool(intervals.valid[b, 0]):
            rows.append(query.new_zeros(n_heads, 1, head_dim))
            continue
        start, end = int(intervals.start[b, 0]), int(intervals.end[b, 0])
        n_past = (end - start) // c
        own = slice(start + n_past * c, end + 1)
        keys, values = key[b, :, own], value[b, :, own]  # (Hk, L, D)
        if groups > 1:
            keys, values = (x[:, None].expand(-1, groups, -1, -1).flatten(0, 1) for x in (keys, values))
        k_past = min(top_k - 1, n_past)
        if k_past > 0:
            with torch.no_grad():
                if memo is not None:
                    sums = memo.get(b, key[b].detach(), start, n_past, c)
                else:
                    sums = block_sums(key[b].detach(), start, n_past, c)
                q = query[b, :, 0].detach().to(GATE_DTYPE).view(n_kv, groups, head_dim)
                picked = torch.matmul(q, sums.transpose(1, 2)).topk(k_past, dim=-1).indices  # (Hk, G, k)
            past = slice(start, start + n_past * c)

            def gather(x: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
                blocks = x[b, :, past].unflatten(1, (n_past, c))[kv_index, picked]  # noqa: B023  (Hk, G, k, c, D)
                return torch.cat([blocks.flatten(0, 1).flatten(1, 2), own], dim=1)  # (H, k*c + L, D)

            keys, values = gather(key, keys), gather(value, values)
        rows.append(torch.nn.functional.scaled_dot_product_attention(query[b], keys, values, scale=scale))
    return torch.stack(rows)
