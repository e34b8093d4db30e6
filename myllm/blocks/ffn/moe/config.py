"""Validated configs of the ``moe`` and ``coe`` FFN blocks.

Every check happens here, before any module is built: ``top_k`` within ``[1, n_experts]``, groups that
divide the experts, ``topk_group <= n_group`` with enough experts left for ``top_k``, known balancing
modes with non-negative coefficients, at least one Chain-of-Experts iteration.

Balancing (``balance``) maps a mode to its coefficient; modes combine freely:

- ``"switch"``: Switch/Mixtral auxiliary loss ``E * sum_e f_e * P_e`` (HF ``load_balancing_loss_func``);
- ``"seq_aux"``: DeepSeek-V3 sequence-wise auxiliary loss;
- ``"z_loss"``: router z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE);
- ``"loss_free"``: DeepSeek auxiliary-loss-free balancing; the value is the bias update rate ``u`` of
  ``b_i += u * sign(mean_load - load_i)``, applied by :func:`myllm.blocks.ffn.moe.update_router_bias`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, field_validator, model_validator
from transformers.activations import ACT2FN

from myllm.blocks.registry import BlockConfig

BalanceMode = Literal["switch", "seq_aux", "z_loss", "loss_free"]
ScoreFunc = Literal["softmax", "sigmoid"]
ExpertsImpl = Literal["grouped", "eager"]


class MoEConfig(BlockConfig):
    """Keyword arguments of :class:`myllm.blocks.ffn.moe.MoE` (all of them, validated).

    Sizes: ``hidden_size`` H, ``n_experts`` E routed experts of intermediate size ``intermediate_size`` I,
    ``top_k`` K experts per token, ``n_shared_experts`` always-on experts of ``shared_intermediate_size``
    (default I) each, stored as one MLP of intermediate ``n_shared_experts * shared_intermediate_size``.
    """

    hidden_size: PositiveInt
    n_experts: PositiveInt
    top_k: PositiveInt
    intermediate_size: PositiveInt
    act: str = "silu"
    # router
    score_func: ScoreFunc = "softmax"
    temperature: PositiveFloat = 1.0  # scores = score_func(logits / temperature)
    norm_topk_prob: bool = True  # renormalise the K selected weights to sum 1
    routed_scaling_factor: PositiveFloat = 1.0
    n_group: PositiveInt = 1  # DeepSeek-V3 group-limited routing
    topk_group: PositiveInt = 1
    score_correction_bias: bool = False  # DeepSeek-V3 ``e_score_correction_bias`` buffer (selection only)
    jitter: NonNegativeFloat = 0.0  # training only: router input *= U(1 - jitter, 1 + jitter)
    # shared experts
    n_shared_experts: NonNegativeInt = 0
    shared_intermediate_size: PositiveInt | None = None
    shared_gate: bool = False  # Qwen2-MoE: shared output *= sigmoid(shared_expert_gate(x))
    # balancing: mode -> coefficient (for "loss_free": the bias update rate)
    balance: dict[BalanceMode, NonNegativeFloat] = {}
    # implementation of the routed experts: "grouped" (sorted tokens, grouped GEMM) or "eager" (reference loop)
    experts_impl: ExpertsImpl = "grouped"

    @field_validator("act")
    @classmethod
    def _known_activation(cls, v: str) -> str:
        if v not in ACT2FN:
            raise ValueError(f"unknown activation {v!r}; valid: {', '.join(sorted(ACT2FN))}")
        return v

    @field_validator("jitter")
    @classmethod
    def _jitter_below_one(cls, v: float) -> float:
        if v >= 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _check_routing(self) -> MoEConfig:
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts})")
        if self.n_experts % self.n_group:
            raise ValueError(f"n_group ({self.n_group}) must divide n_experts ({self.n_experts})")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        reachable = self.topk_group * (self.n_experts // self.n_group)
        if self.top_k > reachable:
            raise ValueError(
                f"top_k ({self.top_k}) exceeds the experts in the {self.topk_group} selected groups ({reachable})"
            )
        if self.shared_gate and self.n_shared_experts == 0:
            raise ValueError("shared_gate=True needs n_shared_experts >= 1")
        return self

    @property
    def has_score_bias(self) -> bool:
        """Whether the router holds ``e_score_correction_bias`` (explicitly, or for loss-free balancing)."""
        return self.score_correction_bias or "loss_free" in self.balance


class CoEConfig(MoEConfig):
    """Keyword arguments of :class:`myllm.blocks.ffn.moe.CoE`: a :class:`MoEConfig` plus the chain.

    ``top_k`` is the number of experts per token *per iteration*.
    """

    n_iterations: PositiveInt = 2
    independent_routers: bool = True  # one router per iteration (CoE's ``use_igate``)
    inner_residual: bool = True  # x(t) = experts(x(t-1)) + x(t-1)

    @field_validator("n_iterations", mode="before")
    @classmethod
    def _at_least_one_iteration(cls, v: object) -> object:
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError(f"Chain-of-Experts needs n_iterations >= 1, got {v}")
        return v
