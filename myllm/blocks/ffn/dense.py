"""Dense feed-forward block.

Gated (SwiGLU when ``act="silu"``): ``down(act(gate(x)) * up(x))`` with the parameter names of HF's
``LlamaMLP`` (``gate_proj``, ``up_proj``, ``down_proj``) so weights move across unchanged.
Plain MLP (``gated=False``): ``down(act(up(x)))``; there is no ``gate_proj``.

Shapes: ``x [..., hidden_size] -> [..., hidden_size]``.
"""

from __future__ import annotations

import torch
from pydantic import PositiveInt, field_validator
from torch import nn
from transformers.activations import ACT2FN

from myllm.blocks.registry import BlockConfig, register


class DenseFFNConfig(BlockConfig):
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    act: str = "silu"
    gated: bool = True
    bias: bool = False

    @field_validator("act")
    @classmethod
    def _known_activation(cls, v: str) -> str:
        if v not in ACT2FN:
            raise ValueError(f"unknown activation {v!r}; valid: {', '.join(sorted(ACT2FN))}")
        return v


def _example() -> dict:
    return {"hidden_size": 16, "intermediate_size": 24}


@register("ffn", "dense", config=DenseFFNConfig, example=_example)
class DenseFFN(nn.Module):
    """Gated (SwiGLU) or plain MLP; ``x [..., H] -> [..., H]``."""

    def __init__(
        self, *, hidden_size: int, intermediate_size: int, act: str = "silu", gated: bool = True, bias: bool = False
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gated = gated
        self.act_name = act
        if gated:
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))
