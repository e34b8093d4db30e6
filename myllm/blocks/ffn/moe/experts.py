"""Routed experts in the transformers v5 fused layout: the ``experts`` (+ ``combine``) stage.

``gate_up_proj [E, 2I, H]`` holds every expert's gate rows ``[0, I)`` then up rows ``[I, 2I)``;
``down_proj [E, H, I]``. Expert e computes ``down_e(act(gate_e(x)) * up_e(x))``. This is the layout of
``MixtralExperts``, ``Qwen2MoeExperts``, ``DeepseekV3Experts``..., so HF expert weights load unchanged and
PEFT ``target_parameters=["gate_up_proj", "down_proj"]`` applies.

Two implementations, same results (tests compare outputs and gradients):

- ``"grouped"`` (default): :func:`myllm.blocks.ffn.moe.kernels.fused_experts` on rows sorted by expert;
- ``"eager"``: the plain reference, one autograd-composed MLP per expert that received rows.

Legend: N tokens, H hidden, I intermediate, E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from myllm.blocks.ffn.moe.dispatch import DispatchPlan, dispatch
from myllm.blocks.ffn.moe.kernels import fused_experts


class Experts(nn.Module):
    """E gated MLPs stored as two fused 3-D parameters.

    Call as HF experts: ``experts(hidden_states [N, H], top_k_index [N, K], top_k_weights [N, K]) -> [N, H]``,
    or with a ready :class:`DispatchPlan`: ``experts(hidden_states, plan=plan)``. Going through ``__call__``
    (not a bare method) matters: module hooks, e.g. DeepSpeed ZeRO-3 parameter gathering, run there.
    """

    def __init__(
        self, *, n_experts: int, hidden_size: int, intermediate_size: int, act: str = "silu", impl: str = "grouped"
    ) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.act = act
        self.act_fn = ACT2FN[act]
        self.impl = impl
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def extra_repr(self) -> str:
        return (
            f"n_experts={self.n_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, act={self.act}, impl={self.impl}"
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor | None = None,
        top_k_weights: torch.Tensor | None = None,
        *,
        plan: DispatchPlan | None = None,
    ) -> torch.Tensor:
        """Apply the experts to routed rows and combine them per token: ``[N, H] -> [N, H]``.

        Args:
            hidden_states: ``[N, H]``.
            top_k_index: ``[N, K]`` selected experts (HF call), or
            top_k_weights: ``[N, K]`` their weights (HF call).
            plan: the rows already sorted by expert (instead of ``top_k_index`` / ``top_k_weights``).
        """
        if plan is None:
            plan = dispatch(top_k_index, top_k_weights, self.n_experts)
        if self.impl == "eager":
            return self.reference(hidden_states, plan)
        return fused_experts(
            hidden_states,
            self.gate_up_proj,
            self.down_proj,
            plan.token,
            plan.weights,
            plan.counts,
            plan.offsets,
            self.act,
        )

    def expert_mlp(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on ``x [n, H] -> [n, H]`` (plain ops)."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self.down_proj[e])

    def reference(self, hidden_states: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Plain reference: loop over experts that received rows; weight after the down projection."""
        x = hidden_states.to(self.gate_up_proj.dtype)
        out = torch.zeros_like(x)
        start = 0
        for e, c in enumerate(plan.counts.tolist()):
            if c:
                rows = slice(start, start + c)
                token = plan.token[rows]
                y = self.expert_mlp(e, x[token]) * plan.weights[rows, None].to(x.dtype)
                out = out.index_add(0, token, y)
            start += c
        if start == 0:  # no rows at all: keep both parameters in the graph (ZeRO-3 hooks expect them)
            out = out + 0.0 * (self.gate_up_proj.sum() + self.down_proj.sum())
        return out.to(hidden_states.dtype)
