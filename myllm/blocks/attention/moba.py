"""MoBA attention block (``attention`` block ``moba``): GQA attention whose kernel is Mixture of Block Attention.

The block has exactly the parameters of :class:`~myllm.blocks.attention.base.Attention` (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, optional Qwen3 ``q_norm``/``k_norm``), so converting a trained attention
module to MoBA keeps its weights: it is a kernel swap (see :mod:`myllm.surgery.moba`). MoBA's settings
(``chunk_size``, ``top_k``) live on the module, never in a global table, so models (or layers) with different
settings coexist in one process; a hybrid model keeps other layers on a dense block.

The kernel is :func:`~myllm.blocks.attention.moba_kernels.moba_attention` (block-sparse, memory
``O(T * H * D)``) or, with ``kernel="reference"``, the dense masked reference. Both honour the attention mask
(left padding, packed sequences, decoding after a cache) and ``scaling``; decoding with a KV cache selects
blocks sparsely for every step; the module remembers the float64 key-block sums of each cache layer it
decodes from (:class:`~myllm.blocks.attention.moba_decode.BlockSums`, held weakly, validated against the
cache) so a step does not re-read the whole cache. The algorithm, including the meaning of ``top_k = 1``
(own block only), is documented in :mod:`myllm.blocks.attention.moba_reference`.

Note (MoBA paper, issue #10 of MoonshotAI/MoBA): converting a model trained with full attention to MoBA
needs continued training; without it the outputs change wherever ``top_k * chunk_size`` is below the length.
"""

from __future__ import annotations

import weakref
from typing import Any, Literal

import torch
from pydantic import PositiveInt, model_validator
from transformers.cache_utils import Cache

from myllm.blocks.attention.base import Attention, AttentionConfig
from myllm.blocks.attention.moba_kernels import BlockSums, moba_attention
from myllm.blocks.attention.moba_reference import moba_reference
from myllm.blocks.registry import register


class MobaConfig(AttentionConfig):
    """:class:`AttentionConfig` plus MoBA's block size and number of blocks per query (own block included)."""

    chunk_size: PositiveInt
    top_k: PositiveInt
    kernel: Literal["sparse", "reference"] = "sparse"

    @model_validator(mode="after")
    def _check_moba(self) -> MobaConfig:
        if self.dropout:
            raise ValueError("MoBA does not support attention dropout; use dropout=0.0")
        return self


def _example() -> dict:
    return {"hidden_size": 32, "num_heads": 4, "num_kv_heads": 2, "chunk_size": 2, "top_k": 2}


@register("attention", "moba", config=MobaConfig, example=_example)
class MobaAttention(Attention):
    """GQA attention with the MoBA kernel; ``chunk_size`` and ``top_k`` are per module."""

    takes_sliding_window_mask = False  # block selection assumes each query's keys are one causal run

    def __init__(self, *, chunk_size: int, top_k: int, kernel: str = "sparse", **kwargs: Any) -> None:
        config = MobaConfig(chunk_size=chunk_size, top_k=top_k, kernel=kernel, **kwargs)  # validate
        super().__init__(**kwargs)
        self.block_kwargs = config.model_dump()  # what rebuilds this block (e.g. for a saved recipe)
        self.chunk_size = chunk_size
        self.top_k = top_k
        self.kernel = kernel
        self._block_sums: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache layer -> BlockSums
        self._cache: Cache | None = None  # the cache of the forward call in progress

    def forward(self, *args: Any, cache: Cache | None = None, past_key_values: Cache | None = None, **kwargs: Any):
        """The GQA forward (see :class:`Attention`); remembers the cache so decoding can reuse block sums."""
        self._cache = cache if cache is not None else past_key_values
        try:
            return super().forward(*args, cache=self._cache, **kwargs)
        finally:
            self._cache = None

    def _memo(self) -> BlockSums | None:
        layers = getattr(self._cache, "layers", None)
        if layers is None or self.layer_idx >= len(layers):
            return None
        layer = layers[self.layer_idx]
        if layer not in self._block_sums:
            self._block_sums[layer] = BlockSums()
        return self._block_sums[layer]

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
        kw = {"chunk_size": self.chunk_size, "top_k": self.top_k, "scaling": scaling}
        if self.kernel == "reference":
            out = moba_reference(query, key, value, attention_mask, **kw)
        else:
            out = moba_attention(query, key, value, attention_mask, block_sums=self._memo(), **kw)
        return out.transpose(1, 2), None

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, top_k={self.top_k}, kernel={self.kernel!r}"
