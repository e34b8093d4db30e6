"""Model-level MoE utilities: the aux-loss-free bias update and per-layer load statistics.

- :func:`update_router_bias`: call after each optimizer step (the training loop does); every router with
  loss-free balancing moves its ``e_score_correction_bias`` by ``u * sign(mean_load - load_i)`` using the
  tokens it routed since the previous call, summed over data-parallel ranks when torch.distributed is
  initialised (one all-reduce for all routers, so ranks stay in step).
- :func:`expert_load`: tokens per expert and MaxVio of every MoE layer's last forward (the seed's
  "check the expert load balance").
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from myllm.blocks.ffn.moe.balance import max_vio
from myllm.blocks.ffn.moe.layer import RoutedExperts
from myllm.blocks.ffn.moe.router import Router


@torch.no_grad()
def update_router_bias(model: nn.Module) -> None:
    """Aux-loss-free balancing step for every loss-free router in ``model`` (no-op if there is none)."""
    routers = [
        m
        for m in model.modules()
        if isinstance(m, Router) and m.e_score_correction_bias is not None and m.bias_update_rate
    ]
    if not routers:
        return
    loads = torch.stack([r.load_since_update for r in routers]).float()  # [R, E]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(loads, op=dist.ReduceOp.SUM)
    for router, load in zip(routers, loads, strict=True):
        router.update_bias(load)


def _load_entry(load: torch.Tensor) -> dict:
    return {"tokens_per_expert": [int(c) for c in load.tolist()], "max_vio": max_vio(load)}


def expert_load(model: nn.Module) -> dict[str, dict]:
    """Per MoE layer (module name -> stats) of its last forward.

    Each entry: ``tokens_per_expert`` (list of E ints, summed over routing steps), ``max_vio``
    (``(max - mean) / mean``, 0 = perfect balance) and ``per_step`` (the same two for each routing step;
    one for ``moe``, one per iteration for ``coe``). Padding is excluded once the layer's ``aux_loss``
    received the attention mask (the MyLLM model passes it). Layers that have not run are omitted.
    """
    out: dict[str, dict] = {}
    for name, module in model.named_modules():
        if isinstance(module, RoutedExperts) and module.records:
            loads = module.last_loads
            entry = _load_entry(torch.stack(loads).sum(0))
            entry["per_step"] = [_load_entry(load) for load in loads]
            out[name] = entry
    return out
