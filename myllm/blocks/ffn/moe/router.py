"""Top-k token router: the ``route`` stage of an MoE block.

Covers the routers of Mixtral (softmax, top-k, renormalised), Qwen2-MoE (softmax, top-k, not renormalised)
and DeepSeek-V3 (sigmoid scores; ``e_score_correction_bias`` added for *selection only*; group-limited
routing over ``n_group`` groups of which ``topk_group`` are kept, a group scored by the sum of its two best
biased scores; weights are the unbiased scores of the chosen experts, optionally renormalised, times
``routed_scaling_factor``). Parameter names follow HF (``weight [E, H]``, buffer
``e_score_correction_bias [E]`` in float32), so HF router weights load unchanged.

Additions: temperature smoothing (``scores = score_func(logits / temperature)``) and training-time
multiplicative jitter of the router input.

Legend: N tokens (B*T), H hidden size, E experts, K experts per token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class RouterOutput(NamedTuple):
    """Result of routing N tokens (a named tuple, so hooks that walk module outputs, e.g. DeepSpeed
    ZeRO-3's, see every tensor).

    Attributes:
        logits: ``[N, E]`` float32 raw router logits (before temperature), as HF's ``router_logits``.
        scores: ``[N, E]`` float32 routing scores (softmax or sigmoid of ``logits / temperature``).
        weights: ``[N, K]`` float32 combine weights of the selected experts.
        indices: ``[N, K]`` int64 selected experts.
    """

    logits: torch.Tensor
    scores: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor


class Router(nn.Module):
    """Linear router ``[N, H] -> RouterOutput`` with softmax/sigmoid scores and (group-limited) top-k.

    The bias buffer (when present) only shifts which experts are *selected*; it never enters the weights
    and receives no gradient. In training the owning block accumulates tokens per expert in
    ``load_since_update`` (int64 ``[E]``) for the aux-loss-free bias update
    (:func:`myllm.blocks.ffn.moe.update_router_bias`).
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        n_experts: int,
        top_k: int,
        score_func: str = "softmax",
        temperature: float = 1.0,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        n_group: int = 1,
        topk_group: int = 1,
        score_bias: bool = False,
        bias_update_rate: float = 0.0,
        jitter: float = 0.0,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.n_experts = n_experts
        self.top_k = top_k
        self.score_func = score_func
        self.temperature = temperature
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.n_group = n_group
        self.topk_group = topk_group
        self.bias_update_rate = bias_update_rate
        self.jitter = jitter
        self.weight = nn.Parameter(torch.empty(n_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        if score_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        # tokens per expert routed in training since the last bias update (not saved with the model)
        self.register_buffer("load_since_update", torch.zeros(n_experts, dtype=torch.int64), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, n_experts={self.n_experts}, top_k={self.top_k}, "
            f"score_func={self.score_func}, n_group={self.n_group}, topk_group={self.topk_group}"
        )

    def scores_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``[N, E]`` routing scores (float32) from raw logits: temperature, then softmax or sigmoid."""
        z = logits.float() / self.temperature if self.temperature != 1.0 else logits.float()
        return z.softmax(dim=-1) if self.score_func == "softmax" else z.sigmoid()

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """``[N, K]`` selected experts from ``[N, E]`` scores: bias for selection, group limit, top-k."""
        choice = scores.detach()
        if self.e_score_correction_bias is not None:
            choice = choice + self.e_score_correction_bias
        if self.n_group > 1:
            n = choice.shape[0]
            per_group = self.n_experts // self.n_group
            grouped = choice.view(n, self.n_group, per_group)
            group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)  # [N, n_group]
            keep = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~group_mask.unsqueeze(-1).expand_as(grouped).reshape(n, -1), float("-inf"))
        return torch.topk(choice, k=self.top_k, dim=-1, sorted=False).indices

    def forward(self, hidden_states: torch.Tensor) -> RouterOutput:
        """Route ``hidden_states [N, H]`` (or ``[..., H]``, flattened) to ``K`` experts each."""
        x = hidden_states.reshape(-1, self.hidden_size)
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = F.linear(x.float(), self.weight.float())  # [N, E]
        scores = self.scores_from_logits(logits)
        indices = self.select(scores)  # [N, K]
        weights = scores.gather(1, indices)  # unbiased scores of the chosen experts
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        return RouterOutput(logits=logits, scores=scores, weights=weights, indices=indices)

    @torch.no_grad()
    def record_load(self, counts: torch.Tensor) -> None:
        """Accumulate tokens per expert ``[E]`` of a training forward for the aux-loss-free update.

        (Activation checkpointing recomputes the forward and so counts each step twice: the sign rule of
        :meth:`update_bias` is invariant to that scaling.)
        """
        if self.training:
            self.load_since_update.add_(counts)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor | None = None) -> None:
        """Aux-loss-free step ``b_i += u * sign(mean(load) - load_i)``; resets the accumulated load.

        Args:
            load: ``[E]`` tokens per expert to balance (default: ``load_since_update``, e.g. after an
                all-reduce across data-parallel ranks done by the caller).
        """
        if self.e_score_correction_bias is None or self.bias_update_rate == 0:
            return
        load = (self.load_since_update if load is None else load).float()
        self.e_score_correction_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))
        self.load_since_update.zero_()


@torch.no_grad()
def init_router_state(module: nn.Module) -> None:
    """Zero a :class:`Router`'s load counter ``load_since_update``; a no-op for any other module.

    For a model's ``_init_weights``: ``from_pretrained`` (transformers v5) materialises non-persistent buffers
    with ``torch.empty`` (whatever memory held) and leaves their initialisation to ``_init_weights``; a counter
    left so would make the first aux-loss-free bias update after loading random.
    """
    if isinstance(module, Router):
        module.load_since_update.zero_()
