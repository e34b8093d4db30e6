"""Attention blocks: ``eager`` and ``sdpa`` GQA attention (MoBA and MLA are added by their own modules)."""

from myllm.blocks.attention.base import Attention, AttentionConfig, EagerAttention, SdpaAttention

__all__ = ["Attention", "AttentionConfig", "EagerAttention", "SdpaAttention"]
from myllm.blocks.attention import moba  # noqa: E402,F401,I001  (registers "moba")
from myllm.blocks.attention import mla  # noqa: E402,F401,I001  (registers "mla")
