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
        return value


def _grown_forward(self, hidden_states: torch.Tensor):
    """``hidden_states [N, H]`` -> ``(router_logits [N, E_total], weights [N, K_total], indices [N, K_total])``."""
    base = type(self)._myllm_base_router_class
    n_base = self.myllm_groups[0][1]
    logits, weights, indices = base.forward(_FirstRows(self, n_base), hidden_states)
    x = hidden_states.reshape(-1, self.weight.shape[1])
    all_logits, all_weights, all_indices = [logits], [weights], [indices]
    for start, end, top_k in self.myllm_groups[1:]:
        group_logits = F.linear(x.to(self.weight.dtype), self.weight[start:end])  # [N, n_group]
        probs = group_logits.float().softmax(dim=-1)
        top_w, top_i = probs.topk(top_k, dim=-1)
        all_logits.append(group_logits.to(logits.dtype))
        all_weights.append(top_w.to(weights.dtype))
        all_indices.append(top_i + start)
    return torch.cat(all_logits, dim=-1), torch.cat(all_weights, dim=-1), torch.cat(all_indices, dim=-1)


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

    The caller grows ``weight`` to ``[E_total + n_new, H]``; ``num_experts`` is updated on the new object.
    """
    cls = grown_router_class(type(router))
    new = reclass(router, cls)
    total = int(router.weight.shape[0])
    groups = list(getattr(router, "myllm_groups", [(0, total, int(getattr(router, "top_k", 0)))]))
    new.myllm_groups = groups + [(total, total + n_new, top_k_new)]
    if hasattr(router, "num_experts"):
        new.num_experts = total + n_new
    return new


def is_grown(router: nn.Module) -> bool:
    return hasattr(type(router), "_myllm_base_router_class")
