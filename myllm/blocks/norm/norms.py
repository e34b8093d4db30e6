"""Normalisation blocks.

Every norm block maps ``x [..., D] -> [..., D]`` and carries two capability attributes that the decoder
layer reads instead of branching on names:

* ``placement``: ``"pre"`` (``x + f(norm(x))``, Llama/Qwen) or ``"post"`` (``norm(alpha * x + f(x))``).
* ``residual_alpha``: the skip-branch scale ``alpha`` used with post placement (1.0 otherwise).

DeepNorm (Wang et al. 2022, arXiv 2203.00555) is post-norm with ``alpha = (2N)^(1/4)`` for a decoder of
``N`` layers and an initialisation that scales the FFN, value and output projections by
``beta = (8N)^(-1/4)`` (:func:`deepnorm_init_`). ``alpha`` scales the *skip*, not the sub-layer.
"""

from __future__ import annotations

import math

import torch
from pydantic import PositiveFloat, PositiveInt
from torch import nn

from myllm.blocks.registry import BlockConfig, register


class NormConfig(BlockConfig):
    hidden_size: PositiveInt
    eps: PositiveFloat = 1e-6


def _example() -> dict:
    return {"hidden_size": 16}


@register("norm", "rmsnorm", config=NormConfig, example=_example)
class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, matching ``LlamaRMSNorm`` bit for bit.

    ``y = weight * (x / sqrt(mean(x^2) + eps))``; ``x [..., D] -> [..., D]``.
    """

    placement = "pre"
    residual_alpha = 1.0

    def __init__(self, *, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class LayerNormConfig(NormConfig):
    bias: bool = True


@register("norm", "layernorm", config=LayerNormConfig, example=_example)
class LayerNorm(nn.LayerNorm):
    """Standard LayerNorm (``torch.nn.LayerNorm``) with keyword-only construction; pre-norm placement."""

    placement = "pre"
    residual_alpha = 1.0

    def __init__(self, *, hidden_size: int, eps: float = 1e-6, bias: bool = True) -> None:
        super().__init__(hidden_size, eps=eps, bias=bias)


class DeepNormConfig(LayerNormConfig):
    num_layers: PositiveInt = 1


def _deepnorm_example() -> dict:
    return {"hidden_size": 16, "num_layers": 4}


@register("norm", "deepnorm", config=DeepNormConfig, example=_deepnorm_example)
class DeepNorm(LayerNorm):
    """DeepNet post-LayerNorm for a decoder-only stack of ``num_layers`` blocks.

    The decoder layer computes ``x = LN(alpha * x + f(x))`` with ``alpha = (2 * num_layers) ** 0.25``;
    ``init_beta = (8 * num_layers) ** -0.25`` is the gain :func:`deepnorm_init_` applies to the FFN,
    value and output projections.
    """

    placement = "post"

    def __init__(self, *, hidden_size: int, eps: float = 1e-6, bias: bool = True, num_layers: int = 1) -> None:
        super().__init__(hidden_size=hidden_size, eps=eps, bias=bias)
        self.num_layers = num_layers
        self.residual_alpha = (2.0 * num_layers) ** 0.25
        self.init_beta = (8.0 * num_layers) ** -0.25

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.residual_alpha:.4f}, num_layers={self.num_layers}"


@torch.no_grad()
def deepnorm_init_(weights: list[torch.Tensor], *, beta: float, generator: torch.Generator | None = None) -> None:
    """DeepNet initialisation: ``xavier_normal_`` with gain ``beta`` on each given weight, in place.

    Args:
        weights: the FFN (gate/up/down), value and output projection weights of one layer, each ``[out, in]``
            (or fused ``[E, out, in]``, treated per expert).
        beta: ``(8N) ** -0.25`` for a decoder of ``N`` layers (``DeepNorm.init_beta``).

    Weights that transformers flagged as already loaded (``_is_hf_initialized``) are left untouched, so the
    initialisation can run inside a model's ``_init_weights`` without overwriting checkpoint weights.
    """
    for w in weights:
        if getattr(w, "_is_hf_initialized", False):
            continue
        mats = w.unsqueeze(0) if w.dim() == 2 else w.reshape(-1, *w.shape[-2:])
        for m in mats:
            fan_out, fan_in = m.shape
            std = beta * math.sqrt(2.0 / (fan_in + fan_out))
            m.normal_(0.0, std, generator=generator)
