"""Shared experts: the ``shared`` stage, always on for every token.

``n`` shared experts of intermediate size ``I_s`` are one gated MLP of intermediate ``n * I_s`` (the
concatenation of their rows), stored as DeepSeek-V3 stores them (``shared_experts.{gate,up,down}_proj``).
Qwen2-MoE's optional sigmoid gate ``shared_expert_gate: Linear(H, 1)`` scales the shared output per token;
it lives on the MoE block under HF's name.

Shapes: ``x [N, H] -> [N, H]``.
"""

from __future__ import annotations

import torch
from torch import nn

from myllm.blocks.ffn.dense import DenseFFN


class SharedExperts(DenseFFN):
    """``n_experts`` always-on gated MLPs of ``intermediate_size`` each, fused into one MLP."""

    def __init__(self, *, hidden_size: int, n_experts: int, intermediate_size: int, act: str = "silu") -> None:
        super().__init__(hidden_size=hidden_size, intermediate_size=n_experts * intermediate_size, act=act)
        self.n_experts = n_experts
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(lin.weight, std=0.02)


def gated_shared_output(x: torch.Tensor, shared: SharedExperts, gate: nn.Linear | None) -> torch.Tensor:
    """Shared experts' output ``[N, H]``, scaled by ``sigmoid(gate(x))`` when a gate is given.

    The per-token scale is applied to the intermediate activation ``[N, n * I_s]`` before the (bias-free,
    linear) down projection, which is the same function as scaling the output, with less work when
    ``n * I_s < H``.
    """
    if gate is None:
        return shared(x)
    h = shared.act_fn(shared.gate_proj(x)) * shared.up_proj(x)
    if h.shape[-1] <= x.shape[-1]:
        return shared.down_proj(h * torch.sigmoid(gate(x)))
    return torch.sigmoid(gate(x)) * shared.down_proj(h)
