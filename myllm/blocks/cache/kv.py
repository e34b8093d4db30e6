"""KV caches from transformers, exposed through the registry.

A cache holds per layer ``key``/``value [B, Hk, T, D]``. ``myllm.blocks.build("cache", "dynamic",
config=model.config)`` returns a :class:`transformers.DynamicCache` that grows with the sequence;
``"static"`` returns a :class:`transformers.StaticCache` preallocated to ``max_cache_len`` (for
``torch.compile`` and fixed-memory serving). Both are passed to ``model(..., cache=...)`` or
``model.generate(..., past_key_values=...)``.
"""

from __future__ import annotations

from typing import Any

from pydantic import PositiveInt, field_validator
from transformers import DynamicCache, PreTrainedConfig, StaticCache

from myllm.blocks.registry import BlockConfig, register


def _is_config(value: Any) -> Any:
    if value is not None and not isinstance(value, PreTrainedConfig):
        raise ValueError(f"config must be a transformers PreTrainedConfig, got {type(value).__name__}")
    return value


class DynamicCacheConfig(BlockConfig):
    config: Any = None  # PreTrainedConfig | None
    offloading: bool = False

    _check_config = field_validator("config")(classmethod(lambda cls, v: _is_config(v)))


class StaticCacheConfig(BlockConfig):
    config: Any  # PreTrainedConfig
    max_cache_len: PositiveInt
    offloading: bool = False

    _check_config = field_validator("config")(classmethod(lambda cls, v: _is_config(v)))


def _tiny_config() -> PreTrainedConfig:
    return PreTrainedConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_hidden_layers=2
    )


@register("cache", "dynamic", config=DynamicCacheConfig, example=lambda: {"config": _tiny_config()})
def build_dynamic_cache(*, config: PreTrainedConfig | None = None, offloading: bool = False) -> DynamicCache:
    """A growing cache (one layer entry per decoder layer of ``config``, or created lazily without one)."""
    return DynamicCache(config=config, offloading=offloading)


@register("cache", "static", config=StaticCacheConfig, example=lambda: {"config": _tiny_config(), "max_cache_len": 16})
def build_static_cache(*, config: PreTrainedConfig, max_cache_len: int, offloading: bool = False) -> StaticCache:
    """A cache preallocated to ``max_cache_len`` tokens per layer."""
    return StaticCache(config=config, max_cache_len=max_cache_len, offloading=offloading)
