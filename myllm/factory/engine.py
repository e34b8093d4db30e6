"""``myllm.factory.replace``: swap blocks inside a live model, atomically, and record what was done.

Data flow (see ARCHITECTURE.md):

1. **resolve** the slot modules (slot table, structural fallback or ``targets=``) in the chosen layers;
2. **validate** everything before anything changes: block kwargs from the model's own sizes plus the caller's
   overrides (pydantic), a weight mover for every target, post-norm consistency, model state (no meta or
   ZeRO-3-partitioned parameters, a causal-LM class whose change can be recorded);
3. **build** each new module (in the old module's dtype and device) and let its mover fill the weights;
4. **swap** it in; an invertible mover's old tensors are released right away (peak memory stays near the
   final model's size), everything else is released when the last swap succeeded;
5. **record** the recipe in the config (:mod:`myllm.factory.recipe`).

Steps 3-5 run under a journal: if anything raises, every swap is undone in reverse order and released
tensors are rebuilt exactly from the new modules, so the model is as before (same module objects, same
parameter objects, bit-identical state dict, same config) and the exception propagates.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from myllm import blocks
from myllm.blocks.registry import BlockSpec
from myllm.factory import myllm_model, postnorm, recipe
from myllm.factory.context import block_kwargs, module_dtype_device, module_facts
from myllm.factory.layout import (
    SLOT_KINDS,
    Layout,
    LayoutError,
    Target,
    explicit_targets,
    resolve_layout,
    slot_targets,
    target_at,
)
from myllm.factory.movers import MOVERS, Mover, select_mover


def surgery_options() -> frozenset[str]:
    """Keywords of replace() that configure the weight transfer rather than the block: those movers declare."""
    return frozenset().union(*(m.options for m in MOVERS))


def _recordable(options: dict[str, Any]) -> dict[str, Any]:
    """Options as the recipe records them: JSON values as they are, others (e.g. calibration tensors) by type."""
    out = {}
    for key, value in options.items():
        try:
            json.dumps(value)
            out[key] = value
        except (TypeError, ValueError):
            out[key] = f"<{type(value).__name__}>"
    return out


class SurgeryError(ValueError):
    """The model cannot undergo the requested surgery (its state, not the arguments)."""


@dataclass
class Step:
    target: Target
    kwargs: dict[str, Any]
    mover: Mover | None
    dtype: torch.dtype
    device: torch.device


@dataclass
class Plan:
    kind: str
    spec: BlockSpec
    layout: Layout | None
    steps: list[Step]
    options: dict[str, Any]
    layers: list[int] | None
    layer_switches: list[tuple[Target, type]] = field(default_factory=list)
    final_norm: Target | None = None  # MyLLM: the final norm, rebuilt from the updated specs


def check_model_state(model: nn.Module) -> None:
    """Refuse models whose weights cannot be read here: wrappers, meta tensors, ZeRO-3 partitions."""
    if hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config"):
        raise SurgeryError(f"{type(model).__name__} is a training wrapper; do surgery on the unwrapped model first")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if hasattr(t, "ds_id") or hasattr(t, "ds_status"):
            raise SurgeryError(
                f"{name} is partitioned by DeepSpeed ZeRO-3; do surgery before deepspeed.initialize "
                f"(or on a gathered, unpartitioned model)"
            )
        if t.is_meta:
            raise SurgeryError(f"{name} is on the meta device; load or materialise the weights before surgery")


def _layer_of(plan_layout: Layout | None, target: Target, model: nn.Module) -> nn.Module | None:
    """The decoder layer that directly holds ``target`` (None for the final norm or unknown layouts)."""
    if plan_layout is None:
        return None
    prefix = f"{plan_layout.layers}.{target.layer_idx}"
    return target.parent if target.path.rpartition(".")[0] == prefix else None


def _plan_layer_switches(model: nn.Module, plan: Plan) -> None:
    """For norm replacements: which decoder layers must switch between pre- and post-norm residuals."""
    layout = plan.layout
    new_placement = getattr(plan.spec.builder, "placement", "pre")
    if layout is None:
        if new_placement == "post":
            raise LayoutError(
                "post-norm blocks need a decoder layout the factory understands (slot table or fallback)"
            )
        return
    if myllm_model.is_myllm(model):
        return  # MyLLM decoder layers read each norm's placement themselves
    by_layer: dict[int, tuple[nn.Module, Target]] = {}
    for step in plan.steps:
        layer = _layer_of(layout, step.target, model)
        if layer is not None:
            by_layer[id(layer)] = (layer, step.target)
    replaced = {step.target.path for step in plan.steps}
    for layer, target in by_layer.values():
        prefix = target.path.rpartition(".")[0]
        norms = layout.slots["norm"]
        placements = {
            new_placement if f"{prefix}.{n}" in replaced else postnorm.placement(getattr(layer, n)) for n in norms
        }
        if len(placements) > 1:
            raise LayoutError(f"{prefix} would mix pre- and post-norm norms; replace all its norms together")
        want_post = placements == {"post"}
        if want_post == postnorm.is_post_norm_layer(layer):
            continue
        if want_post:
            if len(norms) != 2:
                raise LayoutError(f"post-norm needs exactly two norms per layer; {prefix} has {list(norms)}")
            slots = (layout.attention, layout.ffn, norms[0], norms[1])
            cls = postnorm.post_norm_class(postnorm.base_layer_class(layer), slots)
        else:
            cls = postnorm.base_layer_class(layer)
        parent_path, _, attr = prefix.rpartition(".")
        plan.layer_switches.append(
            (
                Target(
                    path=prefix,
                    parent=model.get_submodule(parent_path),
                    attr=attr,
                    module=layer,
                    layer_idx=target.layer_idx,
                ),
                cls,
            )
        )


def plan_replace(
    model: nn.Module,
    kind: str,
    name: str,
    *,
    layers: Any = None,
    targets: Any = None,
    kwargs: dict[str, Any],
    structural: bool = False,
) -> Plan:
    """Resolve and validate a replacement without changing anything (see :func:`replace`)."""
    if kind not in SLOT_KINDS:
        raise LayoutError(f"unknown slot kind {kind!r}; valid kinds: {', '.join(SLOT_KINDS)}")
    spec = blocks.get(kind, name)
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in surgery_options()}
    if not structural:
        check_model_state(model)
        recipe.check_promotable(model)
    if targets is not None:
        if layers is not None:
            raise LayoutError("pass either layers= or targets=, not both")
        chosen = explicit_targets(model, targets)
        try:
            layout = resolve_layout(model)
        except LayoutError:
            layout = None
        layer_list = None
    else:
        layout, chosen = slot_targets(model, kind, layers)
        layer_list = sorted({t.layer_idx for t in chosen if t.path.startswith(layout.layers + ".")})
    final_norm = None
    if myllm_model.is_myllm(model) and layout is not None and not structural:
        final_norm = next((t for t in chosen if t.path == layout.final_norm), None)
        chosen = [t for t in chosen if t is not final_norm]  # rebuilt from the specs (may be an Identity)
        _check_no_added_experts(model, chosen)
    steps = []
    for t in chosen:
        facts = module_facts(kind, t.module, model.config, t.layer_idx)
        kw = block_kwargs(spec, facts, kwargs)
        if not (getattr(spec.builder, "kwargs_from_weights", False) and not structural):
            spec.validate(**kw)  # blocks whose sizes come from the weights (MLA) are validated after their mover
        mover = None
        if not structural:
            mover = select_mover(kind, t.module, spec, kw, options)
            kw = mover.check(t.module, spec, kw, options)
            spec.validate(**kw)
        dtype, device = module_dtype_device(t.module, model)
        steps.append(Step(target=t, kwargs=kw, mover=mover, dtype=dtype, device=device))
    plan = Plan(kind=kind, spec=spec, layout=layout, steps=steps, options=options, layers=layer_list)
    if kind == "norm":
        _plan_layer_switches(model, plan)
    if myllm_model.is_myllm(model) and not structural:
        _plan_myllm(model, plan, final_norm)
    return plan


def _check_no_added_experts(model: nn.Module, chosen: list[Target]) -> None:
    """MyLLM: a spec-based replace cannot keep experts that ``add_experts`` inserted (recorded separately)."""
    grown = {p for e in recipe.surgeries(model.config) if e.get("op") == "add_experts" for p in e["targets"]}
    hit = sorted(t.path for t in chosen if t.path in grown)
    if hit:
        raise LayoutError(
            f"{', '.join(hit)} hold experts inserted by add_experts (config.myllm_surgeries); a replace there would "
            "drop them from the saved structure. Replace before adding experts."
        )


def _plan_myllm(model: nn.Module, plan: Plan, final_norm: Target | None) -> None:
    """MyLLM records replacements as block specs: every target must be a whole slot of a decoder layer."""
    layout = plan.layout
    per_layer: dict[int, set[str]] = {}
    for step in plan.steps:
        if _layer_of(layout, step.target, model) is None:
            raise LayoutError(f"{step.target.path} is not a slot of a MyLLM decoder layer")
        per_layer.setdefault(step.target.layer_idx, set()).add(step.target.attr)
    need = set(layout.slots[plan.kind])
    partial = sorted(i for i, attrs in per_layer.items() if attrs != need)
    if partial:
        raise LayoutError(
            f"MyLLM builds a slot's modules from one spec per layer: replace all of {sorted(need)} in layers {partial}"
        )
    if final_norm is not None:
        if len(per_layer) != model.config.num_hidden_layers:
            raise LayoutError("MyLLM's final norm follows the model-level norm spec: replace the norms of all layers")
        plan.final_norm = final_norm
    if not plan.steps:
        raise LayoutError("nothing to replace")


def _swap(parent: nn.Module, attr: str, module: nn.Module) -> None:
    setattr(parent, attr, module)


class Journal:
    """Undo log of a surgery: callables run in reverse order on failure."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def swap(self, parent: nn.Module, attr: str, new: nn.Module) -> None:
        old = getattr(parent, attr)
        _swap(parent, attr, new)
        self._undo.append(lambda: _swap(parent, attr, old))

    def add(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def rollback(self) -> None:
        while self._undo:
            self._undo.pop()()


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


def release_tensors(old: nn.Module, keep: set[int]) -> list[tuple[torch.Tensor, torch.Size]]:
    """Free the storage of ``old``'s parameters not in ``keep`` (ids); returns what is needed to re-allocate.

    The parameter objects stay (same identity, emptied), so :meth:`Mover.restore` can refill them exactly.
    """
    released = []
    for t in old.parameters():
        if id(t) in keep or t.numel() == 0:
            continue
        released.append((t, t.shape))
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    return released


def reallocate(released: list[tuple[torch.Tensor, torch.Size]]) -> None:
    for t, shape in released:
        t.data = torch.empty(shape, dtype=t.dtype, device=t.device)


def execute(model: nn.Module, plan: Plan, *, entry: dict[str, Any] | None) -> None:
    """Build, fill, swap (and record ``entry``) under a journal; on any error restore and re-raise."""
    journal = Journal()
    targets = {id(s.target.module) for s in plan.steps}
    inside = {id(t) for s in plan.steps for t in _tensors(s.target.module)}
    outside = {id(t) for m in model.modules() if id(m) not in targets for t in _tensors(m) if id(t) not in inside}
    options = {**plan.options, "_std": float(getattr(model.config, "initializer_range", None) or 0.02)}
    try:
        for step in plan.steps:
            old = step.target.module
            new = step.mover.build(plan.spec, step.kwargs, old, step.dtype, step.device)
            step.mover.fill(old, new, options)
            journal.swap(step.target.parent, step.target.attr, new)
            if step.mover.is_invertible(plan.options):
                keep = outside | {id(t) for t in _tensors(new)}
                released = release_tensors(old, keep)
                if released:
                    journal.add(
                        lambda released=released, old=old, new=new, mover=step.mover: (
                            reallocate(released),
                            mover.restore(old, new),
                        )
                    )
        for target, cls in plan.layer_switches:
            journal.swap(target.parent, target.attr, postnorm.reclass(getattr(target.parent, target.attr), cls))
            if hasattr(model, "_no_split_modules") and isinstance(model._no_split_modules, set):
                model._no_split_modules.add(cls.__name__)
        if entry is not None and myllm_model.is_myllm(model):
            _record_myllm(model, plan, journal)
        elif entry is not None:
            journal.add(recipe.record(model, entry))
    except BaseException:
        journal.rollback()
        raise


def _record_myllm(model: nn.Module, plan: Plan, journal: Journal) -> None:
    specs = {
        s.target.layer_idx: myllm_model.block_spec(model.config, plan.kind, plan.spec.name, s.kwargs)
        for s in plan.steps
    }
    journal.add(myllm_model.update_specs(model, plan.kind, specs, plan.final_norm is not None))
    if plan.kind == "norm":
        myllm_model.rewire_norms(model, sorted(specs), journal)
    if plan.final_norm is not None:
        t = plan.final_norm
        journal.swap(t.parent, t.attr, myllm_model.final_norm_module(model, t.module))


def _common_and_per_target(steps: list[Step]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    first = steps[0].kwargs
    common = {k: v for k, v in first.items() if all(k in s.kwargs and s.kwargs[k] == v for s in steps)}
    per_target = {}
    for s in steps:
        diff = {k: v for k, v in s.kwargs.items() if k not in common}
        if diff:
            per_target[s.target.path] = diff
    return common, per_target


def replace(
    model: nn.Module,
    kind: str,
    name: str,
    *,
    layers: Any = None,
    targets: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """Replace the ``kind`` blocks of ``model`` by registry block ``name``, in place; returns ``model``.

    Args:
        model: a Hugging Face causal LM (an architecture of the slot table, a Llama-like one the structural
            fallback recognises, or any model with ``targets=``), or a myllm model.
        kind: ``"attention"``, ``"ffn"`` or ``"norm"``.
        name: a registered block of that kind (``myllm.blocks.available(kind)``).
        layers: decoder-layer indices, a ``range``, or a predicate ``int -> bool``; default all layers (for
            ``norm`` that includes the final norm).
        targets: instead of slots, module paths to replace: a regex (full match), a list of them, or a
            predicate ``(path, module) -> bool``.
        **kwargs: block keywords overriding the sizes read from the model (``n_experts=8, top_k=2``), and
            surgery options (``init="copy" | "split" | "random"`` for FFN upcycling, ``init_seed``,
            ``split_scale``).

    Raises:
        myllm.blocks.RegistryError: unknown kind or block name.
        pydantic.ValidationError: a bad block keyword or sizes that do not fit (e.g. heads vs groups).
        myllm.factory.LayoutError: unsupported model, layers out of range, no target matched.
        myllm.factory.MoveError: the replaced weights cannot move into the block.
        SurgeryError: meta or ZeRO-3-partitioned parameters, or a training wrapper.

    On any error the model is left exactly as it was.
    """
    plan = plan_replace(model, kind, name, layers=layers, targets=targets, kwargs=kwargs)
    common, per_target = _common_and_per_target(plan.steps)
    entry = {
        "op": "replace",
        "kind": kind,
        "name": plan.spec.name,
        "layers": plan.layers,
        "targets": [s.target.path for s in plan.steps],
        "kwargs": common,
        "per_target": per_target,
        "options": _recordable(plan.options),
    }
    execute(model, plan, entry=entry)
    return model


@recipe.recipe_op("replace")
def replay_replace(model: nn.Module, entry: dict[str, Any]) -> None:
    """Structural replay of a recorded replace: build the blocks with the recorded keywords and swap them in."""
    spec = blocks.get(entry["kind"], entry["name"])
    per_target = entry.get("per_target") or {}
    plan_steps = []
    for path in entry["targets"]:
        kw = {**entry["kwargs"], **per_target.get(path, {})}
        target = target_at(model, path)
        plan_steps.append(Step(target=target, kwargs=kw, mover=None, dtype=torch.get_default_dtype(), device=None))
    try:
        layout = resolve_layout(model)
    except LayoutError:
        layout = None
    plan = Plan(kind=entry["kind"], spec=spec, layout=layout, steps=plan_steps, options={}, layers=entry.get("layers"))
    if plan.kind == "norm":
        _plan_layer_switches(model, plan)
    for step in plan.steps:
        _swap(step.target.parent, step.target.attr, spec.build(**step.kwargs))
    for target, cls in plan.layer_switches:
        _swap(target.parent, target.attr, postnorm.reclass(getattr(target.parent, target.attr), cls))
