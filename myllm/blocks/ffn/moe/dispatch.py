"""The ``dispatch`` stage: sort the N*K (token, expert) pairs by expert.

Legend: N tokens, K experts per token, S = N*K routed rows, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    """Where each routed row goes, sorted by expert.

    Attributes:
        token: ``[S]`` int64 source token of each sorted row (rows of expert 0 first, then expert 1, ...).
        weights: ``[S]`` combine weight of each sorted row (differentiable, gathered from the router).
        counts: ``[E]`` int64 rows per expert.
        offsets: ``[E]`` int32 cumulative row counts (end of each expert's block), as grouped GEMMs want.
        n_tokens: N.
    """

    token: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    n_tokens: int

    @property
    def n_experts(self) -> int:
        return self.counts.shape[0]


def dispatch(indices: torch.Tensor, weights: torch.Tensor, n_experts: int) -> DispatchPlan:
    """Sort routed rows by expert.

    Args:
        indices: ``[N, K]`` selected experts.
        weights: ``[N, K]`` their combine weights (gradients flow back through the plan's ``weights``).
        n_experts: E.
    """
    n_tokens, top_k = indices.shape
    flat = indices.reshape(-1)
    expert_sorted, order = torch.sort(flat, stable=True)  # [S]
    counts = torch.bincount(expert_sorted, minlength=n_experts)
    return DispatchPlan(
        token=torch.div(order, top_k, rounding_mode="floor"),
        weights=weights.reshape(-1).index_select(0, order),
        counts=counts,
        offsets=torch.cumsum(counts, 0, dtype=torch.int32),
        n_tokens=n_tokens,
    )
