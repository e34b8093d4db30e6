"""Dense -> MoE weight transforms (pure functions on state dicts), in the HF v5 fused experts layout.

Layout (E experts, H hidden, I intermediate per expert): ``gate_up_proj [E, 2I, H]`` with rows ``[0:I]`` the
gate projection (w1) and ``[I:2I]`` the up projection (w3); ``down_proj [E, H, I]`` (w2). A dense gated MLP
``down(act(gate(x)) * up(x))`` has ``gate_proj.weight [I, H]``, ``up_proj.weight [I, H]``,
``down_proj.weight [H, I]``.

Inits (``init=``):

* ``"copy"`` (Sparse Upcycling, arXiv 2212.05055): every expert is the dense MLP. The MoE output is
  ``sum_k w_k * mlp(x) = (sum_k w_k) * mlp(x)``, so the block equals the dense MLP **exactly when the
  combine weights of the selected experts sum to 1**: softmax (or sigmoid) top-k with the K weights
  renormalised (``norm_topk_prob=True``), ``routed_scaling_factor = 1``, and no extra output (no shared
  experts, or shared experts whose output projection is zero). It then holds for any router weights.
  Without renormalisation the output is scaled by the routed probability mass and is not preserved.
* ``"split"`` (LLaMA-MoE, arXiv 2406.16554): the I neurons are partitioned into E disjoint sets of
  ``I / E`` (a seeded random permutation), so ``sum_e expert_e(x) = mlp(x)``. Each expert's ``down_proj``
  is multiplied by ``split_scale``, default ``E``: LLaMA-MoE scales the MoE output by ``E / K`` for gates
  of about 1 each; with gates renormalised to sum 1 (about ``1 / K`` each) the same correction is
  ``E / K * K = E``. The expected output under uniform routing then equals the dense output, and it is
  exact when ``top_k == E`` with uniform gates (a zero router).
* ``"random"``: experts drawn from ``N(0, std)``; nothing is preserved.

Biases and non-gated MLPs have no place in the fused layout and are rejected.
"""

from __future__ import annotations

import torch

DenseState = dict[str, torch.Tensor]  # gate_proj.weight [I, H], up_proj.weight [I, H], down_proj.weight [H, I]
ExpertsState = dict[str, torch.Tensor]  # gate_up_proj [E, 2I, H], down_proj [E, H, I]

UPCYCLE_INITS = ("copy", "split", "random")


def check_dense(dense: DenseState) -> tuple[int, int]:
    """``(I, H)`` of a gated bias-free dense MLP state dict; ``ValueError`` otherwise."""
    keys = {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    extra = sorted(k for k in dense if k not in keys)
    if extra:
        raise ValueError(f"the fused experts layout has no place for {', '.join(extra)} (biases are not supported)")
    missing = sorted(keys - set(dense))
    if missing:
        raise ValueError(f"a gated MLP needs {', '.join(sorted(keys))}; missing {', '.join(missing)}")
    inter, hidden = dense["up_proj.weight"].shape
    if tuple(dense["gate_proj.weight"].shape) != (inter, hidden) or tuple(dense["down_proj.weight"].shape) != (
        hidden,
        inter,
    ):
        raise ValueError("gate/up/down shapes of the dense MLP do not agree")
    return inter, hidden


def split_permutation(intermediate: int, n_experts: int, *, seed: int = 0) -> torch.Tensor:
    """``[E, I/E]`` neuron indices of each expert: a seeded random partition of ``range(I)``."""
    if intermediate % n_experts:
        raise ValueError(f"split needs intermediate_size ({intermediate}) divisible by n_experts ({n_experts})")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(intermediate, generator=g).view(n_experts, intermediate // n_experts)


def upcycle_dense(
    dense: DenseState,
    *,
    n_experts: int,
    init: str = "copy",
    split_scale: float | None = None,
    seed: int = 0,
    std: float = 0.02,
) -> ExpertsState:
    """Fused experts from a dense gated MLP (see the module docstring for each ``init``).

    Args:
        dense: ``gate_proj.weight [I, H]``, ``up_proj.weight [I, H]``, ``down_proj.weight [H, I]``.
        n_experts: E.
        init: ``"copy"``, ``"split"`` or ``"random"``.
        split_scale: factor on each split expert's ``down_proj`` (default E).
        seed: seed of the split permutation and of the random init.
        std: standard deviation of the random init.

    Returns:
        ``{"gate_up_proj": [E, 2I', H], "down_proj": [E, H, I']}`` in the dense dtype and device, with
        ``I' = I`` (copy, random) or ``I / E`` (split). Each tensor is allocated once and written once.
    """
    if init not in UPCYCLE_INITS:
        raise ValueError(f"unknown upcycling init {init!r}; valid: {', '.join(UPCYCLE_INITS)}")
    inter, hidden = check_dense(dense)
    gate, up, down = dense["gate_proj.weight"], dense["up_proj.weight"], dense["down_proj.weight"]
    like = {"dtype": down.dtype, "device": down.device}
    if init == "copy":
        gate_up = torch.empty(n_experts, 2 * inter, hidden, **like)
        gate_up[:, :inter].copy_(gate)
        gate_up[:, inter:].copy_(up)
        down_e = torch.empty(n_experts, hidden, inter, **like)
        down_e.copy_(down)
        return {"gate_up_proj": gate_up, "down_proj": down_e}
    if init == "split":
        perm = split_permutation(inter, n_experts, seed=seed).to(down.device)  # [E, I/E]
        scale = float(n_experts if split_scale is None else split_scale)
        gate_up = torch.cat([gate[perm], up[perm]], dim=1)  # [E, 2I/E, H]
        down_e = down[:, perm].permute(1, 0, 2).contiguous()  # [E, H, I/E]
        if scale != 1.0:
            down_e.mul_(scale)
        return {"gate_up_proj": gate_up, "down_proj": down_e}
    g = torch.Generator(device=down.device).manual_seed(seed)
    gate_up = torch.empty(n_experts, 2 * inter, hidden, **like).normal_(0.0, std, generator=g)
    down_e = torch.empty(n_experts, hidden, inter, **like).normal_(0.0, std, generator=g)
    return {"gate_up_proj": gate_up, "down_proj": down_e}


def expert_as_dense(experts: ExpertsState, index: int = 0) -> DenseState:
    """One expert of a fused layout as a dense MLP state dict (the inverse of ``copy`` for any expert)."""
    gate_up, down = experts["gate_up_proj"][index], experts["down_proj"][index]
    inter = gate_up.shape[0] // 2
    return {
        "gate_proj.weight": gate_up[:inter].clone(),
        "up_proj.weight": gate_up[inter:].clone(),
        "down_proj.weight": down.clone(),
    }
