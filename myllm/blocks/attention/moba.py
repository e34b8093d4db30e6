"""MoBA attention block (``attention`` block ``moba``): GQA attention whose kernel is Mixture of Block Attention.

The block has exactly the parameters of :class:`~myllm.blocks.attention.base.Attention` (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, optional Qwen3 ``q_norm``/``k_norm``), so converting a trained attention
module to MoBA keeps its weights: it is a kernel swap (see :mod:`myllm.surgery.moba`). MoBA's settings
(``chunk_size``, ``top_k``) live on the module, never in a global table, so models (or layers) with different
settings coexist in one process; a hybrid model keeps other layers on a dense block.

The kernel is :func:`~myllm.blocks.attention.moba_kernels.moba_attention` (block-sparse, memory
``O(T * H * D)``) or, with ``kernel="reference"``, the dense masked reference. Both honour the attention mask
(left padding, packed sequences, decoding after a cache) and ``scaling``; decoding with a KV cache selects
blocks sparsely for every step. The algorithm, including the meaning of ``top_k = 1`` (own block only), is
documented in :mod:`myllm.blocks.attention.moba_reference`.

Note (MoBA paper, issue #10 of MoonshotAI/MoBA): converting a model trained with full attention to MoBA
needs continued training; without it the outputs change wherever ``top_k * chunk_size`` is below the length.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import PositiveInt, model_validator

from myllm.blocks.attention.base import Attention, AttentionConfig
from myllm.blocks.attention.moba_kernels import moba_attention
from myllm.blocks.attention.moba_reference import moba_reference
from myllm.blocks.registry import register


class MobaConfig(AttentionConfig):
    """:class:`AttentionConfig` plus MoBA's block size and number of blocks per query (own block included)."""

    chunk_size: PositiveInt
    top_k: PositiveInt
    kernel: Literal["sparse", "reference"] = "sparse"

    @model_validator(mode="after")
    def _check_moba(self) -> MobaConfig:
        if self.sliding_window is not None:
            raise ValueError("MoBA does not combine with sliding_window (its blocks follow the sequence start)")
        if self.dropout:
            raise ValueError("MoBA does not support attention dropout; use dropout=0.0")
        return self


def _example() -> dict:
    return {"hidden_size": 32, "num_heads": 4, "num_kv_heads": 2, "chunk_size": 2, "top_k": 2}


@register("attention", "moba", config=MobaConfig, example=_example)
class MobaAttention(Attention):
    """GQA attention with the MoBA kernel; ``chunk_size`` and ``top_k`` are per module."""

    def __init__(self, *, chunk_size: int, top_k: int, kernel: str = "sparse", **kwargs: Any) -> None:
        MobaConfig(chunk_size=chunk_size, top_k=top_k, kernel=kernel, **kwargs)  # validate when built directly
        super().__init__(**kwargs)
        self.chunk_size = chunk_size
        self.top_k = top_k
        self.kernel = kernel

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """``q [B, H, Tq, D]``, ``k``/``v [B, Hk, Tk, D]`` -> ``(out [B, Tq, H, D], None)``."""
        fn = moba_reference if self.kernel == "reference" else moba_attention
        out = fn(query, key, value, attention_mask, chunk_size=self.chunk_size, top_k=self.top_k, scaling=scaling)
        return out.transpose(1, 2), None

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, top_k={self.top_k}, kernel={self.kernel!r}"
