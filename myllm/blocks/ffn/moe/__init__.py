"""Mixture-of-Experts FFN blocks ``moe`` and ``coe`` and their parts.

Public API: the blocks :class:`MoE` / :class:`CoE` (configs :class:`MoEConfig` / :class:`CoEConfig`),
the parts (:class:`Router`, :class:`Experts`, :class:`SharedExperts`), :func:`update_router_bias` (call
after each optimizer step for aux-loss-free balancing), :func:`expert_load` (tokens per expert and MaxVio
per layer), and the HF converters in :mod:`myllm.blocks.ffn.moe.hf`.
"""

from myllm.blocks.ffn.moe.coe import CoE
from myllm.blocks.ffn.moe.config import CoEConfig, MoEConfig
from myllm.blocks.ffn.moe.experts import Experts
from myllm.blocks.ffn.moe.layer import MoE, RoutedExperts
from myllm.blocks.ffn.moe.router import Router, RouterOutput
from myllm.blocks.ffn.moe.shared import SharedExperts
from myllm.blocks.ffn.moe.stats import expert_load, update_router_bias

__all__ = [
    "CoE",
    "CoEConfig",
    "Experts",
    "MoE",
    "MoEConfig",
    "RoutedExperts",
    "Router",
    "RouterOutput",
    "SharedExperts",
    "expert_load",
    "update_router_bias",
]
