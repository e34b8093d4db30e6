"""The ``coe`` FFN block: Chain-of-Experts (Wang et al., arXiv 2506.18945).

C iterations over one expert pool, each a full MoE step (route -> dispatch -> experts -> combine ->
shared) with its own router (``independent_routers``, CoE's ``use_igate``) that re-routes the previous
iteration's output::

    x(0) = x;   x(t) = step_t(x(t-1)) + x(t-1)   (inner residual; without it x(t) = step_t(x(t-1)))

Output: with the inner residual the block returns ``x(C) - x(0) = sum_t step_t(...)``, i.e. the update,
so it drops into a pre-norm decoder layer whose outer residual adds the input back (the reference code's
``outer_residual=False`` quirk, which drops the pre-norm stream, is not reproduced). Without the inner
residual it returns ``x(C)``. Either way ``n_iterations=1`` is exactly the ``moe`` block.

Reuses :class:`~myllm.blocks.ffn.moe.layer.RoutedExperts` (same router, experts, shared parts and
stages); routers are ``gates.0``, ``gates.1``, ... Each iteration's router adds its own balancing terms to
``aux_loss``; ``last_router_logits`` is the last iteration's, ``last_router_logits_all`` all of them.

Shapes: ``[B, T, H] -> [B, T, H]``.
"""

from __future__ import annotations

import torch
from torch import nn

from myllm.blocks.ffn.moe.config import CoEConfig, ExpertsImpl, ScoreFunc
from myllm.blocks.ffn.moe.layer import RoutedExperts
from myllm.blocks.registry import register


def _example() -> dict:
    return {
        "hidden_size": 16,
        "n_experts": 4,
        "top_k": 1,
        "intermediate_size": 8,
        "n_iterations": 2,
        "balance": {"seq_aux": 0.001},
    }


@register("ffn", "coe", config=CoEConfig, example=_example)
class CoE(RoutedExperts):
    """Chain-of-Experts FFN (see the module docstring)."""

    def __init__(
        self,
        *,
        hidden_size: int,
        n_experts: int,
        top_k: int,
        intermediate_size: int,
        act: str = "silu",
        score_func: ScoreFunc = "softmax",
        temperature: float = 1.0,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        n_group: int = 1,
        topk_group: int = 1,
        score_correction_bias: bool = False,
        jitter: float = 0.0,
        n_shared_experts: int = 0,
        shared_intermediate_size: int | None = None,
        shared_gate: bool = False,
        balance: dict[str, float] | None = None,
        experts_impl: ExpertsImpl = "grouped",
        n_iterations: int = 2,
        independent_routers: bool = True,
        inner_residual: bool = True,
    ) -> None:
        kwargs = {k: v for k, v in locals().items() if k in CoEConfig.model_fields}
        kwargs["balance"] = balance or {}
        cfg = CoEConfig(**kwargs)  # validate before building anything
        super().__init__()
        self._build_parts(cfg)
        self.n_iterations = cfg.n_iterations
        self.inner_residual = cfg.inner_residual
        n_routers = cfg.n_iterations if cfg.independent_routers else 1
        self.gates = nn.ModuleList(self.make_router() for _ in range(n_routers))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states [B, T, H]`` (or ``[N, H]``) -> same shape."""
        x = self._start(hidden_states)
        update = None
        for t in range(self.n_iterations):
            y = self.step(x, self.gates[t % len(self.gates)])
            if self.inner_residual:
                update = y if update is None else update + y
                x = x + y
            else:
                x = update = y
        return update.view(hidden_states.shape)
