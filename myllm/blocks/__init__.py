"""Interchangeable blocks (attention, ffn, norm, cache) behind one registry.

``myllm.blocks.available("ffn")`` lists names, ``myllm.blocks.build("ffn", "dense", ...)`` builds one.
Importing this package imports every block module, which registers them.
"""

# Importing the kind packages registers their blocks (order matters only for readability).
from myllm.blocks import attention, cache, ffn, norm  # noqa: E402,F401,I001
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
    unregister,
    validate,
)

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
    "unregister",
    "validate",
]
