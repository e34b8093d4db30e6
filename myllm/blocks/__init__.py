"""Interchangeable blocks (attention, ffn, norm, cache) behind one registry.

``myllm.blocks.available("ffn")`` lists names, ``myllm.blocks.build("ffn", "dense", ...)`` builds one.
Importing this package imports every block module, which registers them.
"""

from myllm.blocks.registry import (
    KINDS,
    BlockConfig,
    BlockSpec,
    RegistryError,
    available,
    build,
    get,
    register,
    specs,
    validate,
)

# Importing the kind packages registers their blocks (order matters only for readability).
from myllm.blocks import norm, ffn, attention, cache  # noqa: E402,F401,I001

__all__ = [
    "KINDS",
    "BlockConfig",
    "BlockSpec",
    "RegistryError",
    "available",
    "build",
    "get",
    "register",
    "specs",
    "validate",
]
