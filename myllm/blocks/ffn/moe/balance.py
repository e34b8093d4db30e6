"""Load-balancing losses (pure functions) and MaxVio.

- :func:`switch_aux_loss`: Switch Transformer / Mixtral ``E * sum_e f_e * P_e`` with HF
  ``load_balancing_loss_func`` semantics for one layer: f_e = fraction of (token, slot) assignments to e
  per token (summed over the K slots, so it equals K at perfect balance), P_e = mean routing probability;
  padding rows are excluded when a mask is given.
- :func:`seq_aux_loss`: DeepSeek-V3 sequence-wise loss ``mean_b sum_i f_bi * P_bi`` with
  ``f_bi = E / (K * T_b) * #{t : i in TopK(t)}`` and ``P_bi = mean_t s'_bti`` (scores normalised over the
  experts), T_b the valid tokens of sequence b.
- :func:`router_z_loss`: ST-MoE ``mean_t logsumexp(logits_t)^2``.
- :func:`max_vio`: ``(max_i load_i - mean load) / mean load``.

The aux-loss-free bias update is :meth:`myllm.blocks.ffn.moe.router.Router.update_bias`.

Legend: N tokens (B*T), E experts, K experts per token.
"""

from __future__ import annotations

import torch


def routing_probs(scores: torch.Tensor) -> torch.Tensor:
    """``[..., E]`` scores normalised to a distribution over experts (a no-op for softmax scores)."""
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def _flat_mask(mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    flat = mask.reshape(-1).to(device=device, dtype=torch.float32)
    if flat.shape[0] != n:
        raise ValueError(f"attention_mask has {flat.shape[0]} positions but the router saw {n} tokens")
    return flat


def switch_aux_loss(
    scores: torch.Tensor, indices: torch.Tensor, n_experts: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/Mixtral balancing loss of one layer.

    Args:
        scores: ``[N, E]`` routing scores (normalised with :func:`routing_probs`).
        indices: ``[N, K]`` selected experts.
        n_experts: E.
        mask: ``[N]`` or ``[B, T]``, 1 for real tokens, 0 for padding.
    """
    probs = routing_probs(scores.float())
    n, k = indices.shape
    m = _flat_mask(mask, n, probs.device)
    ones = torch.ones(n * k, device=probs.device) if m is None else m.repeat_interleave(k)
    counts = torch.zeros(n_experts, device=probs.device).scatter_add_(0, indices.reshape(-1), ones)
    prob_sum = probs.sum(0) if m is None else (probs * m.unsqueeze(-1)).sum(0)
    rows = probs.new_tensor(float(n)) if m is None else m.sum().clamp_min(1.0)
    return n_experts * torch.sum((counts / rows) * (prob_sum / rows))


def seq_aux_loss(
    scores: torch.Tensor, indices: torch.Tensor, n_experts: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balancing loss (without the coefficient).

    Args:
        scores: ``[B, T, E]`` routing scores.
        indices: ``[B, T, K]`` selected experts.
        n_experts: E.
        mask: ``[B, T]``, 1 for real tokens; sequences without real tokens are skipped.
    """
    b, t, k = indices.shape
    probs = routing_probs(scores.float())  # [B, T, E]
    m = torch.ones(b, t, device=probs.device) if mask is None else mask.to(probs.device, torch.float32).view(b, t)
    valid = m.sum(1)  # [B]
    counts = torch.zeros(b, n_experts, device=probs.device)
    counts.scatter_add_(1, indices.reshape(b, t * k), m.repeat_interleave(k, dim=1))  # [B, E]
    denom = valid.clamp_min(1.0).unsqueeze(-1)
    f = counts * n_experts / (k * denom)
    p = (probs * m.unsqueeze(-1)).sum(1) / denom
    per_seq = (f * p).sum(-1)  # [B]
    has_tokens = valid > 0
    return per_seq[has_tokens].mean() if bool(has_tokens.any()) else per_seq.sum() * 0.0


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean over real tokens of logsumexp(logits)^2``; ``logits [N, E]``, ``mask [N]`` or ``[B, T]``."""
    z = torch.logsumexp(logits.float(), dim=-1).square()  # [N]
    m = _flat_mask(mask, z.shape[0], z.device)
    if m is None:
        return z.mean()
    return (z * m).sum() / m.sum().clamp_min(1.0)


def max_vio(load: torch.Tensor) -> float:
    """MaxVio ``(max - mean) / mean`` of per-expert loads ``[E]``; 0 when nothing was routed."""
    load = load.double()
    mean = load.mean()
    return 0.0 if mean <= 0 else float((load.max() - mean) / mean)
