"""Norm blocks: ``rmsnorm``, ``layernorm`` (pre-norm) and ``deepnorm`` (DeepNet post-norm)."""

from myllm.blocks.norm.norms import DeepNorm, LayerNorm, RMSNorm, deepnorm_init_

__all__ = ["DeepNorm", "LayerNorm", "RMSNorm", "deepnorm_init_"]
