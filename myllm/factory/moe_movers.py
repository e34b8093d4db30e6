"""Weight movers for MoE targets: dense -> ``moe``/``coe`` upcycling, and MoE -> ``moe`` with the experts kept.

Upcycling (:class:`UpcycleMover`) builds the new block on the meta device and fills it: the fused experts
come from :func:`myllm.surgery.upcycle.upcycle_dense` (``init="copy" | "split" | "random"``, each tensor
allocated and written once, directly in place), routers are drawn from ``N(0, std)`` with the model's
``initializer_range``, and shared experts start with a **zero output projection** so that they add nothing
until trained. With ``init="copy"`` the old MLP's tensors are released as soon as its layer is swapped
(they can be rebuilt exactly from expert 0 if a later layer fails), which keeps the peak memory of an
in-place upcycle near the final model size.

When ``init="copy"`` preserves the function exactly (see :mod:`myllm.surgery.upcycle`): the combine
weights of the selected experts must sum to 1 (``norm_topk_prob=True``, ``routed_scaling_factor=1``),
no shared experts' output (they start at zero, so this holds at init) and, for ``coe``, a single
iteration (a chain applies the experts again to their own output).

MoE -> ``moe`` (:class:`MoEToMoEMover`) keeps the experts: the new block *shares* the old block's expert
parameters, router weights (and DeepSeek bias) and shared experts under the block's names (HF Qwen2-MoE's
``shared_expert`` becomes ``shared_experts``), so a different router or balancing is a zero-copy swap.
"""

from __future__ import annotations

import torch
from torch import nn

from myllm.blocks.registry import BlockSpec
from myllm.factory.movers import (
    MoveError,
    Mover,
    _meta_build,
    build_block,
    materialize,
    meta_buildable,
    register_mover,
    tensor_shapes,
)


def _is_moe_spec(spec: BlockSpec) -> bool:
    return bool(getattr(spec.builder, "is_moe", False))


def _dense_gated(old: nn.Module) -> str | None:
    """None for a bias-free gated MLP (``gate_proj``, ``up_proj``, ``down_proj`` Linears), else why not."""
    lins = [getattr(old, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(lin, nn.Linear) for lin in lins):
        return f"{type(old).__name__} is not a gated MLP (gate_proj/up_proj/down_proj)"
    if any(lin.bias is not None for lin in lins):
        return f"{type(old).__name__} has biases, which the fused experts layout cannot hold"
    return None


class UpcycleMover(Mover):
    """Dense gated MLP -> MoE-like block (``moe``, ``coe``): experts by copy, split or random init."""

    name = "upcycle"
    kinds = ("ffn",)
    options = frozenset({"init", "init_seed", "split_scale"})

    def accepts(self, kind, old, spec, kwargs):
        if not _is_moe_spec(spec):
            return f"{spec.name} is not an MoE block"
        return _dense_gated(old)

    def check(self, old, spec, kwargs, options):
        from myllm.surgery.upcycle import UPCYCLE_INITS

        init = options.get("init", "copy")
        if init not in UPCYCLE_INITS:
            raise MoveError(f"unknown upcycling init {init!r}; valid: {', '.join(UPCYCLE_INITS)}")
        if "n_experts" not in kwargs:
            raise MoveError(f"upcycling to {spec.name} needs n_experts=")
        inter, n = old.up_proj.out_features, kwargs["n_experts"]
        if init == "split":
            if inter % n:
                raise MoveError(f"split needs the dense intermediate size ({inter}) divisible by n_experts ({n})")
            return {**kwargs, "intermediate_size": inter // n}
        if init == "copy":
            return {**kwargs, "intermediate_size": inter}
        return kwargs

    def is_invertible(self, options):
        return options.get("init", "copy") == "copy"

    def build(self, spec, kwargs, old, dtype, device):
        new = _meta_build(spec, kwargs, dtype)
        return new if meta_buildable(new) else build_block(spec, kwargs, dtype=dtype, device=device)

    def fill(self, old, new, options):
        from myllm.surgery.upcycle import upcycle_dense

        init = options.get("init", "copy")
        dense = {k: v.detach() for k, v in old.state_dict().items()}
        experts = upcycle_dense(
            dense,
            n_experts=new.experts.gate_up_proj.shape[0],
            init=init,
            split_scale=options.get("split_scale"),
            seed=options.get("init_seed", 0),
            std=options["_std"],
        )
        if init == "random" and experts["gate_up_proj"].shape != new.experts.gate_up_proj.shape:
            experts = {k: torch.empty_like(getattr(new.experts, k), device=v.device) for k, v in experts.items()}
            for t in experts.values():
                t.normal_(0.0, options["_std"])
        tensors = {f"experts.{k}": v for k, v in experts.items()}
        device = old.down_proj.weight.device
        if next(new.parameters()).is_meta:
            materialize(new, device, tensors, std=options["_std"], zero=("shared_experts.down_proj.weight",))
        else:
            with torch.no_grad():
                for k, v in tensors.items():
                    new.get_parameter(k).copy_(v)
                shared = getattr(new, "shared_experts", None)
                if shared is not None:
                    shared.down_proj.weight.zero_()

    @torch.no_grad()
    def restore(self, old, new):
        from myllm.surgery.upcycle import expert_as_dense

        dense = expert_as_dense({k: getattr(new.experts, k).detach() for k in ("gate_up_proj", "down_proj")}, 0)
        for key, value in dense.items():
            old.get_parameter(key).copy_(value)


def _moe_state_for(old: nn.Module) -> dict[str, torch.Tensor]:
    """The old MoE block's tensors (parameters as objects) under the ``moe`` block's key names."""
    out = {}
    for key, t in old.state_dict(keep_vars=True).items():
        if key.startswith("shared_expert."):  # HF Qwen2-MoE's single shared expert
            key = "shared_experts." + key[len("shared_expert.") :]
        out[key] = t
    return out


class MoEToMoEMover(Mover):
    """An MoE block (HF fused layout or myllm's) -> ``moe`` with another router/balancing; experts kept."""

    name = "moe-to-moe"
    kinds = ("ffn",)
    shares = True

    def accepts(self, kind, old, spec, kwargs):
        from myllm.surgery.experts import moe_parts

        if not _is_moe_spec(spec):
            return f"{spec.name} is not an MoE block"
        if moe_parts(old) is None:
            return f"{type(old).__name__} is not an MoE block in the fused experts layout"
        try:
            want = tensor_shapes(_meta_build(spec, kwargs))
        except Exception as exc:
            return f"cannot build {spec.name}: {exc}"
        have = {k: (tuple(v.shape), v.dtype) for k, v in _moe_state_for(old).items()}
        for key in ("experts.gate_up_proj", "experts.down_proj", "gate.weight"):
            if key not in want:
                return f"{spec.name} has no {key} (only single-router blocks keep the experts)"
            if want[key][0] != have.get(key, ((), None))[0]:
                return f"{key} {have.get(key, ((),))[0]} does not fit {want[key][0]}: the experts are kept as they are"
        lost = sorted(k for k in have if k not in want or want[k][0] != have[k][0])
        lost = [k for k in lost if not k.endswith("e_score_correction_bias")]
        if lost:
            return f"the new block would drop trained weights: {', '.join(lost)}"
        return None

    def build(self, spec, kwargs, old, dtype, device):
        new = _meta_build(spec, kwargs, dtype)
        return new if meta_buildable(new) else build_block(spec, kwargs, dtype=dtype, device=device)

    def fill(self, old, new, options):
        have = _moe_state_for(old)
        want = tensor_shapes(new)
        share = {k: v for k, v in have.items() if k in want and tuple(v.shape) == want[k][0]}
        device = old.experts.gate_up_proj.device
        if next(new.parameters()).is_meta:
            materialize(new, device, share, std=options["_std"])
        else:
            for key, t in share.items():
                mod_path, _, leaf = key.rpartition(".")
                mod = new.get_submodule(mod_path) if mod_path else new
                (mod._parameters if leaf in mod._parameters else mod._buffers)[leaf] = t


register_mover(MoEToMoEMover())
register_mover(UpcycleMover())
