"""MoBA (Mixture of Block Attention, Lu et al. 2025, arXiv 2502.13189): the algorithm and its plain reference.

Shapes: B batch, H query heads, Hk key/value heads (G = H // Hk), Tq queries, Tk keys, D head dim, c chunk
size, k ``top_k``. ``query [B, H, Tq, D]``, ``key``/``value [B, Hk, Tk, D]`` (RoPE applied, cache already
concatenated, GQA *not* expanded) -> ``out [B, H, Tq, D]``.

The algorithm (what the reference here and the efficient path in :mod:`.moba_kernels` compute):

* **Which keys a query may see** comes from the attention mask in any form transformers builds (``None``,
  4-D bool, 4-D float; see :mod:`myllm.blocks.attention.kernels`). For MoBA every query must attend one
  contiguous run of keys ``[start, end]``: ``start`` is where its sequence begins (0, the first real token
  after left padding, or the start of its document in a packed row) and ``end`` is the query's own position
  (:func:`query_intervals`). Runs of different sequences in one row must not overlap (a sliding-window mask is
  rejected with a clear error). Queries that see no key (padding rows) give zeros.
* **Blocks** are contiguous runs of ``chunk_size`` keys counted from the query's sequence start:
  block ``j`` is ``[start + j c, start + (j + 1) c)``; the block holding ``end`` is the query's own block.
* **Gate** (parameter free, per query and per head): the score of a past block is the dot product of the
  query with the block's mean key (of the head's key/value head). Computed in float64 so that both paths pick
  the same blocks up to rounding of the inputs. No gradient flows through the selection.
* **Selection**: ``top_k`` counts the own block, which is always selected (causal inside it); the other
  ``top_k - 1`` are the best-scoring *past* blocks. Future blocks are never candidates. With ``top_k = 1`` a
  query attends its own block only (block-local causal attention; the official naive kernel does the same,
  while the official efficient kernel silently falls back to full attention, which we consider a bug).
  When ``top_k * chunk_size`` covers the sequence, MoBA is exactly causal attention.
* **Attention** is softmax attention over the selected keys with the given ``scaling`` (default
  ``D ** -0.5``).

:func:`moba_reference` builds the selection as a dense ``[B, H, Tq, Tk]`` mask and runs masked softmax
attention: O(T^2) memory, obviously correct; tests compare the efficient path against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from myllm.blocks.attention.kernels import as_bool_mask

GATE_DTYPE = torch.float64


@dataclass(frozen=True)
class QueryIntervals:
    """The contiguous key range ``[start, end]`` each query attends (``[B, Tq]`` each), and which attend any."""

    start: torch.Tensor
    end: torch.Tensor
    valid: torch.Tensor


def query_intervals(
    attention_mask: torch.Tensor | None, *, batch: int, q_len: int, kv_len: int, device: torch.device
) -> QueryIntervals:
    """The key interval of every query, read from a mask in any form transformers builds.

    Args:
        attention_mask: ``None`` (causal top-left for ``Tq > 1``, everything for ``Tq == 1``), or a 4-D bool
            (True = attend) or additive float mask ``[B or 1, 1, >= Tq, >= Tk]``.

    Raises:
        ValueError: the mask is not 4-D with one head, or a query's attended keys are not one contiguous run.
    """
    if attention_mask is None:
        rows = torch.arange(q_len, device=device)
        end = torch.full_like(rows, kv_len - 1) if q_len == 1 else rows.clamp(max=kv_len - 1)
        end = end[None].expand(batch, q_len)
        return QueryIntervals(torch.zeros_like(end), end, torch.ones_like(end, dtype=torch.bool))
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
        raise ValueError(
            f"MoBA needs a 4-D attention mask [B, 1, Tq, Tk] (or None); got shape {tuple(attention_mask.shape)}"
        )
    mask = as_bool_mask(attention_mask, q_len, kv_len, device)[:, 0].expand(batch, q_len, kv_len)
    as_bytes = mask.view(torch.uint8)
    count = as_bytes.sum(-1)
    valid = count > 0
    start = as_bytes.argmax(-1)
    end = kv_len - 1 - as_bytes.flip(-1).argmax(-1)
    if bool(((end - start + 1 != count) & valid).any()):
        raise ValueError(
            "MoBA needs every query to attend one contiguous run of keys (causal masks with padding or packed "
            "sequences); this mask has gaps in a row"
        )
    return QueryIntervals(start, end, valid)


def moba_mask(
    query: torch.Tensor, key: torch.Tensor, intervals: QueryIntervals, *, chunk_size: int, top_k: int
) -> torch.Tensor:
    """The MoBA selection as a dense bool mask ``[B, H, Tq, Tk]`` (True = the query attends the key)."""
    bsz, n_heads, q_len, head_dim = query.shape
    n_kv, kv_len = key.shape[1], key.shape[2]
    groups = n_heads // n_kv
    c = chunk_size
    pos = torch.arange(kv_len, device=query.device)
    start, end = intervals.start[..., None], intervals.end[..., None]  # (B, Tq, 1)
    in_range = (pos >= start) & (pos <= end) & intervals.valid[..., None]  # (B, Tq, Tk)
    key_block = torch.div(pos - start, c, rounding_mode="floor").clamp(min=0)  # (B, Tq, Tk)
    own = torch.div(end - start, c, rounding_mode="floor")  # (B, Tq, 1)

    n_blocks = -(-kv_len // c)
    blocks = torch.arange(n_blocks, device=query.device)
    is_past = blocks < own  # (B, Tq, n_blocks): full blocks before the own block
    block_start = (start + blocks * c).clamp(max=max(kv_len - c, 0))  # (B, Tq, n_blocks)
    prefix = torch.cat(
        [key.new_zeros(bsz, n_kv, 1, head_dim, dtype=GATE_DTYPE), key.to(GATE_DTYPE).cumsum(2)], dim=2
    )  # (B, Hk, Tk + 1, D)

    def rows(idx: torch.Tensor) -> torch.Tensor:  # prefix rows at idx (B, Tq, n) -> (B, Hk, Tq, n, D)
        flat = idx.reshape(bsz, 1, -1, 1).expand(bsz, n_kv, -1, head_dim)
        return prefix.gather(2, flat).view(bsz, n_kv, q_len, n_blocks, head_dim)

    means = (rows((block_start + c).clamp(max=kv_len)) - rows(block_start)) / c  # (B, Hk, Tq, n_blocks, D)
    q = query.detach().to(GATE_DTYPE).view(bsz, n_kv, groups, q_len, 1, head_dim)
    gate = (q * means[:, :, None]).sum(-1)  # (B, Hk, G, Tq, n_blocks)
    gate = gate.masked_fill(~is_past[:, None, None], float("-inf"))
    chosen = torch.zeros_like(gate, dtype=torch.bool)
    k_past = min(top_k - 1, n_blocks)
    if k_past > 0:
        values, picked = gate.topk(k_past, dim=-1)
        chosen.scatter_(-1, picked, values > float("-inf"))
    index = key_block.clamp(max=n_blocks - 1)[:, None, None].expand(bsz, n_kv, groups, q_len, kv_len)
    chosen_key = chosen.gather(-1, index)  # (B, Hk, G, Tq, Tk)
    own_key = (key_block == own)[:, None, None]
    allowed = in_range[:, None, None] & (own_key | chosen_key)
    return allowed.reshape(bsz, n_heads, q_len, kv_len)


def moba_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    chunk_size: int,
    top_k: int,
    scaling: float | None = None,
) -> torch.Tensor:
    """MoBA as masked dense softmax attention (O(T^2) memory): ``[B, H, Tq, D]``; see the module docstring."""
    bsz, n_heads, q_len, head_dim = query.shape
    n_kv, kv_len = key.shape[1], key.shape[2]
    groups = n_heads // n_kv
    scale = head_dim**-0.5 if scaling is None else scaling
    intervals = query_intervals(attention_mask, batch=bsz, q_len=q_len, kv_len=kv_len, device=query.device)
    with torch.no_grad():
        allowed = moba_mask(query, key, intervals, chunk_size=chunk_size, top_k=top_k)
    allowed = allowed.view(bsz, n_kv, groups, q_len, kv_len)
    q = query.view(bsz, n_kv, groups, q_len, head_dim)  # (B, Hk, G, Tq, D)
    scores = (
        torch.matmul(q, key.unsqueeze(2).transpose(-1, -2)).to(accumulation_dtype(query.dtype)) * scale
    )  # (B, Hk, G, Tq, Tk)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).masked_fill(~allowed, 0.0).to(value.dtype)  # empty rows -> zeros
    out = torch.matmul(probs, value.unsqueeze(2))  # (B, Hk, G, Tq, D)
    return out.reshape(bsz, n_heads, q_len, -1)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_moba_inputs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, chunk_size: int, top_k: int
) -> None:
    """Raise ``ValueError`` for settings or shapes MoBA cannot run with."""
    if chunk_size < 1:
        raise ValueError(f"MoBA chunk_size must be >= 1, got {chunk_size}")
    if top_k < 1:
        raise ValueError(f"MoBA top_k must be >= 1 (it counts the query's own block), got {top_k}")
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        raise ValueError(
            f"MoBA expects query [B, H, Tq, D] and key/value [B, Hk, Tk, D] of one shape; got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[1] % key.shape[1] or query.shape[-1] != key.shape[-1] or query.shape[0] != key.shape[0]:
        raise ValueError(
            f"MoBA needs H divisible by Hk and equal batch and head dims; got query {tuple(query.shape)}, "
            f"key {tuple(key.shape)}"
        )
