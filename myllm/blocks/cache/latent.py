"""The ``latent`` cache block: a growing KV cache for MLA layers that holds only what MLA needs per token.

An :class:`~myllm.blocks.attention.mla.MLAttention` layer writes, per token, its compressed latent
``[B, 1, T, kv_lora_rank]`` into the keys slot and its rotated decoupled RoPE key ``[B, 1, T, R * dr]``
(plus ``Hkv`` key-norm scales for ``qk_norm`` blocks) into the values slot: the layout transformers'
DeepSeek-V3 uses, so the cache also serves ``DeepseekV3ForCausalLM``. Per-head keys and values are never
stored; MLA decodes from the latent by weight absorption. Layers of other kinds in a hybrid model (GQA) store
their keys and values as usual, so one cache serves the whole model.

:meth:`LatentCache.bytes_per_token` measures what the cache actually holds per token (all layers, one
sequence), e.g. to report the KV-cache saving of a GQA -> MLA conversion.
"""

from __future__ import annotations

from typing import Any

from pydantic import field_validator
from transformers import DynamicCache, PreTrainedConfig

from myllm.blocks.cache.kv import _is_config, _tiny_config
from myllm.blocks.registry import BlockConfig, register


class LatentCacheConfig(BlockConfig):
    config: Any = None  # PreTrainedConfig | None
    offloading: bool = False

    _check_config = field_validator("config")(classmethod(lambda cls, v: _is_config(v)))


@register("cache", "latent", config=LatentCacheConfig, example=lambda: {"config": _tiny_config()})
class LatentCache(DynamicCache):
    """A :class:`transformers.DynamicCache` for MLA latents (see the module docstring)."""

    def __init__(self, *, config: PreTrainedConfig | None = None, offloading: bool = False) -> None:
        super().__init__(config=config, offloading=offloading)

    def bytes_per_token(self) -> int:
        """Bytes stored per token of one sequence, summed over layers (0 when nothing is cached yet)."""
        total = 0
        for layer in self.layers:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if tensor is not None and tensor.dim() == 4 and tensor.numel():
                    total += tensor.shape[1] * tensor.shape[3] * tensor.element_size()
        return total
