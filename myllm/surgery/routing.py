"""Routers that gained experts: the original experts keep their routing, each added group is routed apart.

Design (why "outputs unchanged at insertion" and "new experts learn" are both true):

* The first ``E`` router rows route exactly as before: the base router class's own ``forward`` runs on a
  view of the router restricted to rows ``[0:E]`` (same code, same numbers), so the old experts' selection
  and combine weights do not change at all.
* Every ``add_experts`` call appends a *group* ``[start, end)`` with its own ``top_k``: its experts are
  chosen by a softmax top-k over the group's own logits, with weights equal to those softmax
  probabilities (not renormalised, so the new router rows get gradients), and appended as extra slots
  to the token's expert list. The HF experts modules accept any number of slots per token.
* New experts start with ``down_proj = 0`` (``zero_output=True``): at insertion they add exactly zero.
  Their ``down_proj`` gradient is ``weight * act(gate x) * (up x)`` (non-zero), so they start learning at
  the first step, and the gate/up projections and router rows follow once ``down_proj`` moved.

The router is replaced (instance-level) by an object of a generated subclass of its own class, so
transformers' output capture (``isinstance`` on the HF router class) still records ``router_logits``
(``[N, E_total]``, the old and new logits side by side).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from myllm.factory.postnorm import reclass

_CLASSES: dict[type, type] = {}


class _FirstRows:
    """Attribute view of a router restricted to its first ``n`` experts (rows of its expert-indexed tensors)."""

    _ROWS = ("weight", "e_score_correction_bias")

    def __init__(self, router: nn.Module, n: int) -> None:
        self._router = router
        self._n = n

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._router, name)
        if name in self._ROWS and isinstance(value, torch.Tensor):
            return value[: self._n]
        if name in ("num_experts", "n_experts"):
            return self._n
        if isinstance(value, types.MethodType) and value.__self__ is self._router:
            return types.MethodType(value.__func__, self)  # the router's own methods see the view too
        return value


def _grown_forward(self, hidden_states: torch.Tensor):
    """Route ``hidden_states [N, H]``: the base router on the first ``E`` experts plus each added group.

    Returns what the base router returns, widened: HF routers ``(logits [N, E_total], weights [N, K_total],
    indices [N, K_total])``; myllm's :class:`~myllm.blocks.ffn.moe.Router` a ``RouterOutput`` whose
    ``logits``/``scores`` are ``[N, E_total]`` and ``weights``/``indices`` ``[N, K_total]`` (a named tuple or
    dataclass with those fields).
    """
    base = type(self)._myllm_base_router_class
    result = base.forward(_FirstRows(self, self.myllm_groups[0][1]), hidden_states)
    x = hidden_states.reshape(-1, self.weight.shape[1]).to(self.weight.dtype)
    logits, probs, weights, indices = [], [], [], []
    for start, end, top_k in self.myllm_groups[1:]:
        group_logits = F.linear(x, self.weight[start:end])  # [N, n_group]
        group_probs = group_logits.float().softmax(dim=-1)
        top_w, top_i = group_probs.topk(top_k, dim=-1)
        logits.append(group_logits)
        probs.append(group_probs)
        weights.append(top_w)
        indices.append(top_i + start)
    named = hasattr(result, "_replace") or dataclasses.is_dataclass(result)  # myllm's RouterOutput
    if not named:
        old_logits, old_weights, old_indices = result
        return (
            torch.cat([old_logits, *(t.to(old_logits.dtype) for t in logits)], dim=-1),
            torch.cat([old_weights, *(t.to(old_weights.dtype) for t in weights)], dim=-1),
            torch.cat([old_indices, *indices], dim=-1),
        )
    replace = result._replace if hasattr(result, "_replace") else lambda **kw: dataclasses.replace(result, **kw)
    return replace(
        logits=torch.cat([result.logits, *(t.to(result.logits.dtype) for t in logits)], dim=-1),
        scores=torch.cat([result.scores, *(t.to(result.scores.dtype) for t in probs)], dim=-1),
        weights=torch.cat([result.weights, *(t.to(result.weights.dtype) for t in weights)], dim=-1),
        indices=torch.cat([result.indices, *indices], dim=-1),
    )


def grown_router_class(base: type) -> type:
    """The generated subclass of router class ``base`` that routes added expert groups apart (cached)."""
    base = getattr(base, "_myllm_base_router_class", base)
    if base not in _CLASSES:
        _CLASSES[base] = type(
            f"Grown{base.__name__}",
            (base,),
            {"forward": _grown_forward, "_myllm_base_router_class": base, "__module__": __name__},
        )
    return _CLASSES[base]


def with_group(router: nn.Module, n_new: int, top_k_new: int) -> nn.Module:
    """A new router object (sharing ``router``'s tensors) that routes ``n_new`` more experts as a group.

    The caller grows ``weight`` to ``[E_total + n_new, H]``. Expert counts (``num_experts`` / ``n_experts``)
    and per-expert buffers (statistics, a DeepSeek selection bias; new rows zero) grow on the new object.
    """
    cls = grown_router_class(type(router))
    new = reclass(router, cls)
    total = int(router.weight.shape[0])
    groups = list(getattr(router, "myllm_groups", [(0, total, int(getattr(router, "top_k", 0)))]))
    new.myllm_groups = groups + [(total, total + n_new, top_k_new)]
    for attr in ("num_experts", "n_experts"):
        if getattr(router, attr, None) == total:
            setattr(new, attr, total + n_new)
    for name, buf in list(new._buffers.items()):
        if buf is not None and buf.dim() >= 1 and buf.shape[0] == total:
            grown = torch.zeros((total + n_new, *buf.shape[1:]), dtype=buf.dtype, device=buf.device)
            grown[:total].copy_(buf)
            new._buffers[name] = grown
    return new


def is_grown(router: nn.Module) -> bool:
    return hasattr(type(router), "_myllm_base_router_class")
