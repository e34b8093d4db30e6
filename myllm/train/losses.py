"""Loss terms: causal-LM cross-entropy counts and knowledge-distillation divergences.

Every function returns a *sum* over the tokens it is given; the objective divides by the number of target
tokens of the whole optimizer step (all micro-batches, all ranks), so gradient accumulation and data
parallelism give the loss of one big batch.

Legend: N tokens, V vocabulary, B batch, T sequence, H heads, D hidden size.

Divergences between teacher distribution ``p_T`` and student ``p_S`` per token (tests compare them with
plain float64 formulas):

* forward KL  = sum_v p_T (log p_T - log p_S)    (mode-covering; classic Hinton KD)
* reverse KL  = sum_v p_S (log p_S - log p_T)    (mode-seeking; MiniLLM)
* generalised JSD_beta = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m),  m = beta * p_T + (1 - beta) * p_S
  (GKD, arXiv 2306.13649; beta = 0.5 is the symmetric Jensen-Shannon divergence).

With temperature ``tau`` both distributions are ``softmax(z / tau)`` and the divergence is multiplied by
``tau ** 2`` so gradient magnitudes do not shrink as ``tau`` grows (Hinton et al. 2015).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets ``[B, T]`` from unshifted labels: ``labels[:, 1:]`` with ``-100`` appended."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Number of tokens that carry a loss after the shift (``labels[..., 1:] != -100``)."""
    return (labels[..., 1:] != IGNORE).sum()


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) ``[N]`` from finite log-probabilities ``[N, V]`` (as log_softmax gives)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _forward_kl(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    return _kl(t, s)


def _reverse_kl(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    return _kl(s, t)


def _jsd(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)


# name -> f(student log-probs [N, V], teacher log-probs [N, V], beta) -> [N]
DIVERGENCES = {"forward_kl": _forward_kl, "reverse_kl": _reverse_kl, "jsd": _jsd}


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-token divergence ``[N]`` between teacher and student logits ``[N, V]``, times ``temperature**2``.

    ``kind``: ``forward_kl``, ``reverse_kl`` or ``jsd`` (see the module docstring). Computed in float32.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose from {', '.join(DIVERGENCES)}")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return DIVERGENCES[kind](s, t, beta) * temperature**2


def kd_loss_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Sum of the per-token divergence over target positions.

    Args:
        student_logits, teacher_logits: ``[B, T, V]`` (position t predicts token t + 1).
        labels: ``[B, T]`` unshifted; positions whose next label is ``-100`` are left out.
    """
    keep = shifted_targets(labels) != IGNORE  # [B, T]
    return divergence(student_logits[keep], teacher_logits[keep], kind=kind, temperature=temperature, beta=beta).sum()


def hidden_mse_sum(student_h: torch.Tensor, teacher_h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over real tokens of the mean squared error across the hidden dimension.

    Args:
        student_h: ``[B, T, D]`` student states already projected to the teacher's size.
        teacher_h: ``[B, T, D]``.
        mask: ``[B, T]`` 1 for real tokens.
    """
    err = (student_h.float() - teacher_h.float()).pow(2).mean(-1)  # [B, T]
    return (err * mask).sum()


def attention_kl_sum(student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over real query tokens of KL(teacher row || student row), averaged over heads.

    Args:
        student_attn: ``[B, Hs, T, T]`` attention probabilities (rows sum to 1 over allowed keys).
        teacher_attn: ``[B, Ht, T, T]``. With ``Hs == Ht`` heads are compared one to one; otherwise the maps are
            first averaged over heads (a head-count-free comparison of where each layer attends).
        mask: ``[B, T]`` 1 for real query tokens.
    """
    s, t = student_attn.float(), teacher_attn.float()
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    eps = torch.finfo(torch.float32).tiny
    kl = (torch.xlogy(t, t) - t * torch.log(s.clamp_min(eps))).sum(-1)  # [B, H, T]
    return (kl.mean(1) * mask).sum()
