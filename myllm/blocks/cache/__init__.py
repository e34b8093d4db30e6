"""Cache blocks: ``dynamic`` and ``static`` (transformers' own cache classes), picked by name from the registry."""

from myllm.blocks.cache.kv import build_dynamic_cache, build_static_cache

__all__ = ["build_dynamic_cache", "build_static_cache"]
from myllm.blocks.cache import latent  # noqa: E402,F401,I001  (registers "latent")
