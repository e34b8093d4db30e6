"""Attention kernels with the transformers v5 attention-function contract.

``fn(module, query, key, value, attention_mask, *, dropout=0.0, scaling=None, **kwargs) -> (out, weights)``

Shapes (B batch, H query heads, Hk key/value heads, G = H // Hk, Tq queries, Tk keys, D head dim):
``query [B, H, Tq, D]``, ``key``/``value [B, Hk, Tk, D]`` (RoPE applied, cache already concatenated,
GQA *not* expanded), ``out [B, Tq, H, D]``, ``weights [B, H, Tq, Tk]`` or ``None``.

``attention_mask`` may arrive in any of the forms transformers produces, because a block swapped into a
Hugging Face model receives the mask that model built for *its* attention implementation:

* ``None``: what transformers means by it: no mask for a single query (decode), otherwise causal
  attention aligned top-left (query i sees keys ``0..i``), which is SDPA's ``is_causal`` and covers the
  prefill of an empty static cache (``Tk > Tq``). Models build an explicit mask whenever past tokens exist.
* a 4-D bool mask ``[B or 1, 1, Tq, Tk]``, True = attend (``sdpa_mask``);
* a 4-D float mask, 0 = attend and a large negative value = masked (``eager_mask``).

Fully masked rows (a batch row that is all padding) never give NaN, in the forward or the backward pass:
``eager_attention`` returns zeros for them; ``sdpa_attention`` returns zeros with a bool mask (PyTorch's
SDPA uses a safe softmax) and a finite average of the values with an additive float mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward


def causal_bool_mask(q_len: int, kv_len: int, device: torch.device | None = None, *, offset: int = 0) -> torch.Tensor:
    """Causal mask ``[Tq, Tk]`` (True = attend) where query i sits at position ``offset + i``.

    ``offset = Tk - Tq`` gives the bottom-right alignment of queries that follow a cache of past keys.
    """
    q_pos = torch.arange(offset, offset + q_len, device=device)
    return q_pos[:, None] >= torch.arange(kv_len, device=device)[None, :]


def as_bool_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Normalise any supported mask form to a bool mask broadcastable to ``[B, 1, Tq, Tk]`` (True = attend)."""
    if attention_mask is None:
        if q_len == 1:
            return torch.ones(1, 1, 1, kv_len, dtype=torch.bool, device=device)
        return causal_bool_mask(q_len, kv_len, device)[None, None]
    if attention_mask.dtype == torch.bool:
        mask = attention_mask
    else:
        # additive float mask: anything far below zero is masked (eager_mask uses finfo.min)
        mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return mask[..., -q_len:, -kv_len:] if mask.dim() == 4 else mask


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention in float32 scores; GQA by grouping query heads, without repeating K/V."""
    bsz, n_heads, q_len, head_dim = query.shape
    n_kv = key.shape[1]
    groups = n_heads // n_kv
    kv_len = key.shape[2]
    scale = head_dim**-0.5 if scaling is None else scaling
    q = query.view(bsz, n_kv, groups, q_len, head_dim)  # (B, Hk, G, Tq, D)
    scores = torch.matmul(q, key.unsqueeze(2).transpose(-1, -2)) * scale  # (B, Hk, G, Tq, Tk)
    mask = as_bool_mask(attention_mask, q_len, kv_len, query.device)  # (B|1, 1, Tq, Tk)
    mask = mask.unsqueeze(2)  # (B|1, 1, 1, Tq, Tk)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32)
    probs = probs.masked_fill(~mask, 0.0).to(query.dtype)  # fully masked rows -> zeros
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value.unsqueeze(2))  # (B, Hk, G, Tq, D)
    out = out.reshape(bsz, n_heads, q_len, -1).transpose(1, 2).contiguous()  # (B, Tq, H, D)
    return out, probs.reshape(bsz, n_heads, q_len, kv_len)


def sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``torch.nn.functional.scaled_dot_product_attention`` through transformers' own sdpa wrapper.

    transformers' wrapper handles GQA (``enable_gqa`` or ``repeat_kv``), ``is_causal`` dispatch and the
    static-cache prefill case; a float mask is passed to SDPA as an additive mask.
    """
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
