"""The ``moe`` FFN block: route -> dispatch -> experts -> combine -> shared.

Parts (each its own module, HF names so weights map across):

- ``gate``: :class:`~myllm.blocks.ffn.moe.router.Router` (``gate.weight [E, H]``, optional
  ``gate.e_score_correction_bias [E]``);
- ``experts``: :class:`~myllm.blocks.ffn.moe.experts.Experts` (``gate_up_proj [E, 2I, H]``,
  ``down_proj [E, H, I]``);
- ``shared_experts``: :class:`~myllm.blocks.ffn.moe.shared.SharedExperts` (optional) and
  ``shared_expert_gate: Linear(H, 1)`` (optional, Qwen2-MoE).

The block follows the FFN contract (``forward(hidden_states [B, T, H]) -> [B, T, H]``, drop-in for HF MLPs)
and the MoE contract: ``is_moe = True``, ``last_router_logits [B*T, E]`` of the last forward, and
``aux_loss(attention_mask=None)`` = sum of the configured balancing terms (coefficients applied). Tokens
per expert of the last forward are in ``last_loads`` (see :func:`myllm.blocks.ffn.moe.expert_load`).

:class:`RoutedExperts` holds everything MoE and Chain-of-Experts share; they differ only in how many
routing steps they take (:meth:`RoutedExperts.step`).

Legend: B batch, T time, N = B*T tokens, H hidden, E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from myllm.blocks.ffn.moe.balance import router_z_loss, seq_aux_loss, switch_aux_loss
from myllm.blocks.ffn.moe.config import ExpertsImpl, MoEConfig, ScoreFunc
from myllm.blocks.ffn.moe.dispatch import dispatch
from myllm.blocks.ffn.moe.experts import Experts
from myllm.blocks.ffn.moe.router import Router, RouterOutput
from myllm.blocks.ffn.moe.shared import SharedExperts, gated_shared_output
from myllm.blocks.registry import register


@dataclass
class RouteRecord:
    """One routing step of the last forward, kept for the balancing losses and the load statistics."""

    router: Router
    route: RouterOutput
    load: torch.Tensor  # [E] int64 tokens per expert (padding removed once a mask was seen)
    training: bool


class RoutedExperts(nn.Module):
    """Parts and stages shared by :class:`MoE` and :class:`~myllm.blocks.ffn.moe.coe.CoE`."""

    is_moe = True

    def _build_parts(self, cfg: MoEConfig) -> None:
        self.block_config = cfg
        self.hidden_size = cfg.hidden_size
        self.n_experts = cfg.n_experts
        self.top_k = cfg.top_k
        self.balance = dict(cfg.balance)
        self.experts = Experts(
            n_experts=cfg.n_experts,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            act=cfg.act,
            impl=cfg.experts_impl,
        )
        if cfg.n_shared_experts:
            self.shared_experts = SharedExperts(
                hidden_size=cfg.hidden_size,
                n_experts=cfg.n_shared_experts,
                intermediate_size=cfg.shared_intermediate_size or cfg.intermediate_size,
                act=cfg.act,
            )
        else:
            self.shared_experts = None
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.shared_gate else None
        if self.shared_expert_gate is not None:
            nn.init.normal_(self.shared_expert_gate.weight, std=0.02)
        self.records: list[RouteRecord] = []
        self._batch_shape: tuple[int, int] = (0, 0)
        self._padding_excluded = False

    def make_router(self) -> Router:
        cfg = self.block_config
        return Router(
            hidden_size=cfg.hidden_size,
            n_experts=cfg.n_experts,
            top_k=cfg.top_k,
            score_func=cfg.score_func,
            temperature=cfg.temperature,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            score_bias=cfg.has_score_bias,
            bias_update_rate=cfg.balance.get("loss_free", 0.0),
            jitter=cfg.jitter,
        )

    # ----------------------------------------------------------------------------------- stages
    def step(self, x: torch.Tensor, router: Router) -> torch.Tensor:
        """One routed pass over ``x [N, H]``: route -> dispatch -> experts -> combine -> shared."""
        route = router(x)  # route
        plan = dispatch(route.indices, route.weights, self.n_experts)  # dispatch
        y = self.experts(x, plan=plan)  # experts + combine (fused in the fast path)
        if self.shared_experts is not None:  # shared
            y = y.add_(gated_shared_output(x, self.shared_experts, self.shared_expert_gate))  # y: fresh kernel output
        router.record_load(plan.counts)
        self.records.append(RouteRecord(router, route, plan.counts.detach().clone(), router.training))
        return y

    def __getstate__(self) -> dict:
        """Pickling and ``copy.deepcopy`` leave out the last forward's routing (graph tensors cannot be copied)."""
        state = dict(super().__getstate__())
        state["records"] = []
        return state

    def _start(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Flatten ``[..., H]`` to ``[N, H]`` and forget the previous forward's routing."""
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"expected hidden size {self.hidden_size}, got input of shape {tuple(hidden_states.shape)}"
            )
        shape = hidden_states.shape[:-1]
        self._batch_shape = (int(shape[0]), int(shape[1:].numel())) if len(shape) > 1 else (1, int(shape.numel()))
        self.records = []
        self._padding_excluded = False
        return hidden_states.reshape(-1, self.hidden_size)

    # ------------------------------------------------------------------------ MoE contract
    @property
    def last_router_logits(self) -> torch.Tensor | None:
        """``[B*T, E]`` router logits of the last forward (CoE: of its last iteration)."""
        return self.records[-1].route.logits if self.records else None

    @property
    def last_router_logits_all(self) -> tuple[torch.Tensor, ...]:
        """Router logits ``[B*T, E]`` of every routing step of the last forward."""
        return tuple(r.route.logits for r in self.records)

    @property
    def last_loads(self) -> list[torch.Tensor]:
        """Tokens per expert ``[E]`` of every routing step of the last forward."""
        return [r.load for r in self.records]

    def aux_loss(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of the configured balancing terms of the last forward, coefficients applied.

        Args:
            attention_mask: ``[B, T]`` (1 = real token) of the last forward's input; padding is excluded
                from every term and, once, from the recorded loads (statistics and loss-free counts).

        Returns:
            A scalar tensor (zero when no loss term is configured or nothing was routed yet).
        """
        if attention_mask is not None:
            self._exclude_padding(attention_mask)
        total = None
        for rec in self.records:
            for mode, coef in self.balance.items():
                term = self._balance_term(mode, rec, attention_mask)
                if term is not None and coef:
                    total = coef * term if total is None else total + coef * term
        if total is None:
            device = self.experts.down_proj.device
            return torch.zeros((), device=device)
        return total

    def _balance_term(self, mode: str, rec: RouteRecord, mask: torch.Tensor | None) -> torch.Tensor | None:
        term = BALANCE_TERMS.get(mode)
        return None if term is None else term(self, rec.route, mask)

    @torch.no_grad()
    def _exclude_padding(self, attention_mask: torch.Tensor) -> None:
        if self._padding_excluded:
            return
        self._padding_excluded = True
        pad = attention_mask.reshape(-1) == 0
        for rec in self.records:
            if pad.shape[0] != rec.route.indices.shape[0]:
                raise ValueError(
                    f"attention_mask has {pad.shape[0]} positions but the router saw {rec.route.indices.shape[0]} tokens"
                )
            padded = torch.bincount(
                rec.route.indices[pad.to(rec.route.indices.device)].reshape(-1), minlength=self.n_experts
            )
            rec.load.sub_(padded)
            if rec.training:
                rec.router.load_since_update.sub_(padded)


def _seq_aux(block: RoutedExperts, route: RouterOutput, mask: torch.Tensor | None) -> torch.Tensor:
    b, t = block._batch_shape
    return seq_aux_loss(route.scores.view(b, t, -1), route.indices.view(b, t, -1), block.n_experts, mask)


BALANCE_TERMS: dict[str, Callable[[RoutedExperts, RouterOutput, torch.Tensor | None], torch.Tensor]] = {
    "switch": lambda block, route, mask: switch_aux_loss(route.scores, route.indices, block.n_experts, mask),
    "seq_aux": _seq_aux,
    "z_loss": lambda block, route, mask: router_z_loss(route.logits, mask),
}
"""Loss terms per balancing mode (``loss_free`` acts through the router bias, not through the loss)."""


def _example() -> dict:
    return {
        "hidden_size": 16,
        "n_experts": 4,
        "top_k": 2,
        "intermediate_size": 8,
        "n_shared_experts": 1,
        "shared_gate": True,
        "balance": {"switch": 0.01, "z_loss": 0.001},
    }


@register("ffn", "moe", config=MoEConfig, example=_example)
class MoE(RoutedExperts):
    """Sparse mixture-of-experts FFN: ``[B, T, H] -> [B, T, H]`` (see the module docstring)."""

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
    ) -> None:
        kwargs = {k: v for k, v in locals().items() if k in MoEConfig.model_fields}
        kwargs["balance"] = balance or {}
        cfg = MoEConfig(**kwargs)  # validate before building anything
        super().__init__()
        self._build_parts(cfg)
        self.gate = self.make_router()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states [B, T, H]`` (or ``[N, H]``) -> same shape."""
        x = self._start(hidden_states)
        return self.step(x, self.gate).view(hidden_states.shape)
