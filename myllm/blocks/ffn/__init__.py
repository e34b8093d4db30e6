"""FFN blocks: ``dense`` (gated SwiGLU or plain MLP); MoE and Chain-of-Experts live in ``myllm.blocks.ffn.moe``."""

from myllm.blocks.ffn import moe  # noqa: F401  (registers "moe" and "coe")
from myllm.blocks.ffn.dense import DenseFFN

__all__ = ["DenseFFN"]
