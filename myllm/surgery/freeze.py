"""Freezing by kind, layer, name pattern or expert rows, and a report of what is trainable.

Whole parameters are frozen with ``requires_grad = False``. Experts are slices (rows along dim 0) of fused
tensors (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, router ``weight [E, H]``), which
``requires_grad`` cannot express, so a frozen row needs two guards:

1. **gradients**: a tensor hook zeroes the frozen rows of the parameter's gradient;
2. **optimizer updates**: a zero gradient is not enough. AdamW's decoupled weight decay shrinks every
   parameter that has a gradient, L2-style decay (Adam, SGD ``weight_decay``) turns the weights into a
   gradient, and momentum keeps moving rows. A global optimizer step pre-hook copies the frozen rows of
   every masked parameter the optimizer is about to step, and the post-hook writes them back and zeroes
   the optimizer state rows (``exp_avg``, ``exp_avg_sq``, momentum buffers) of those rows.

Together the frozen rows stay bit-identical under every ``torch.optim`` optimizer while the other rows train
normally (with their weight decay). The step hooks are torch's global optimizer hooks, installed the first
time a row is frozen; they only act on parameters carrying a row mask. The copy costs the frozen rows'
memory for the duration of a step. Freezing state is not saved with the model (like ``requires_grad``);
:func:`myllm.surgery.freeze_recorded_experts` re-applies what ``add_experts`` recorded, and the training loop
(``myllm train``) calls it when it loads a model.
DeepSpeed's optimizers keep their own fp32 master weights and are not covered: freeze whole parameters
there, or mask inside the engine.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

_MASK = "_myllm_frozen_rows"
_HOOK = "_myllm_frozen_rows_hook"
_SNAPSHOTS: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
_STEP_HOOKS: list = []


def frozen_rows(param: torch.Tensor) -> torch.Tensor | None:
    """Bool ``[R]`` mask of frozen rows (dim 0) of ``param``, or None when no row is frozen."""
    return getattr(param, _MASK, None)


def _row_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _grad_hook(param: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        mask = frozen_rows(param)
        if mask is None:
            return grad
        return grad.masked_fill(_row_mask(mask.to(grad.device), grad), 0)

    return hook


@torch.no_grad()
def _pre_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    saved = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            mask = frozen_rows(p)
            if mask is not None and bool(mask.any()):
                m = mask.to(p.device)
                saved.append((p, m, p.detach()[m].clone()))
    if saved:
        _SNAPSHOTS[id(optimizer)] = saved


@torch.no_grad()
def _post_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for p, m, rows in _SNAPSHOTS.pop(id(optimizer), []):
        p.data[m] = rows
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                value[m] = 0


def _install_step_hooks() -> None:
    if not _STEP_HOOKS:
        _STEP_HOOKS.append(register_optimizer_step_pre_hook(_pre_step))
        _STEP_HOOKS.append(register_optimizer_step_post_hook(_post_step))


def _set_mask(param: torch.Tensor, mask: torch.Tensor | None) -> None:
    if mask is None or not bool(mask.any()):
        if hasattr(param, _MASK):
            delattr(param, _MASK)
        return
    setattr(param, _MASK, mask)
    if getattr(param, _HOOK, None) is None:
        setattr(param, _HOOK, param.register_hook(_grad_hook(param)))
    _install_step_hooks()


def freeze_rows(param: torch.Tensor, rows: Iterable[int], *, frozen: bool = True) -> Callable[[], None]:
    """Freeze (or, with ``frozen=False``, unfreeze) rows of ``param`` along dim 0; returns the undo."""
    previous = frozen_rows(param)
    mask = previous.clone() if previous is not None else torch.zeros(param.shape[0], dtype=torch.bool)
    if mask.shape[0] != param.shape[0]:  # the parameter grew (new experts): new rows start trainable
        grown = torch.zeros(param.shape[0], dtype=torch.bool)
        grown[: min(mask.shape[0], param.shape[0])] = mask[: param.shape[0]]
        mask = grown
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    if idx.numel() and (idx.min() < 0 or idx.max() >= param.shape[0]):
        raise IndexError(f"expert rows {idx.tolist()} out of range for {param.shape[0]} rows")
    mask[idx] = frozen
    _set_mask(param, mask)
    return lambda: _set_mask(param, previous)


@dataclass
class TrainableReport:
    """Trainable vs total parameter counts, per group (slot kind, or top-level module)."""

    total: int = 0
    trainable: int = 0
    groups: dict[str, list[int]] = field(default_factory=dict)  # name -> [trainable, total]

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        lines = [f"trainable parameters: {self.trainable:,} / {self.total:,} ({pct:.2f}%)"]
        width = max((len(k) for k in self.groups), default=5)
        for name, (t, n) in self.groups.items():
            lines.append(f"  {name:<{width}}  {t:>14,} / {n:>14,}  ({100.0 * t / max(n, 1):6.2f}%)")
        return "\n".join(lines)


def _trainable_numel(p: torch.Tensor) -> int:
    if not p.requires_grad:
        return 0
    mask = frozen_rows(p)
    if mask is None:
        return p.numel()
    return int((~mask).sum()) * (p.numel() // max(p.shape[0], 1))


def _slot_prefixes(model: nn.Module, kinds: Sequence[str], layers) -> dict[str, str]:
    from myllm.factory.layout import slot_targets

    out = {}
    for kind in kinds:
        for t in slot_targets(model, kind, layers)[1]:
            out[t.path] = kind
    return out


def trainable_report(model: nn.Module) -> TrainableReport:
    """Counts of trainable parameters (frozen expert rows excluded), grouped by slot kind."""
    from myllm.factory.layout import SLOT_KINDS, LayoutError

    try:
        prefixes = _slot_prefixes(model, SLOT_KINDS, None)
    except LayoutError:
        prefixes = {}
    report = TrainableReport()
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        group = next((kind for pre, kind in prefixes.items() if name.startswith(pre + ".")), name.split(".")[0])
        if group == "model":
            group = ".".join(name.split(".")[:2])
        t = _trainable_numel(p)
        report.total += p.numel()
        report.trainable += t
        counts = report.groups.setdefault(group, [0, 0])
        counts[0] += t
        counts[1] += p.numel()
    return report


def _select(model: nn.Module, pattern: str | None, kind: str | None, layers) -> list[tuple[str, nn.Parameter]]:
    from myllm.factory.layout import decoder_layers, resolve_layout, select_layers

    prefixes: list[str] | None = None
    if kind is not None:
        prefixes = list(_slot_prefixes(model, [kind], layers))
    elif layers is not None:
        layout = resolve_layout(model)
        prefixes = [f"{layout.layers}.{i}" for i in select_layers(layers, len(decoder_layers(model, layout)))]
    regex = re.compile(pattern) if pattern is not None else None
    chosen = []
    for name, p in model.named_parameters():
        if prefixes is not None and not any(name.startswith(pre + ".") for pre in prefixes):
            continue
        if regex is not None and not regex.search(name):
            continue
        chosen.append((name, p))
    if not chosen:
        raise ValueError(f"no parameter matches pattern={pattern!r}, kind={kind!r}, layers={layers!r}")
    return chosen


def _set_trainable(model, pattern, kind, layers, experts, trainable: bool, verbose: bool) -> TrainableReport:
    from myllm.surgery.experts import moe_parts

    chosen = _select(model, pattern, kind, layers)
    if experts is None:
        for _, p in chosen:
            p.requires_grad_(trainable)
            _set_mask(p, None)
    else:
        ids = {id(p) for _, p in chosen}
        rows = list(experts)
        touched = 0
        for block in model.modules():
            parts = moe_parts(block)
            if parts is None:
                continue
            exp, _, router, _ = parts
            for p in (exp.gate_up_proj, exp.down_proj, router.weight):
                if id(p) in ids:
                    freeze_rows(p, rows, frozen=not trainable)
                    if trainable:
                        p.requires_grad_(True)
                    touched += 1
        if not touched:
            raise ValueError("experts= given, but the selection holds no fused experts or router weights")
    report = trainable_report(model)
    if verbose:
        print(report)
    return report


def freeze(
    model: nn.Module,
    pattern: str | None = None,
    *,
    kind: str | None = None,
    layers=None,
    experts: Sequence[int] | None = None,
    verbose: bool = True,
) -> TrainableReport:
    """Freeze parameters selected by name ``pattern`` (``re.search``), slot ``kind`` and ``layers``.

    With no selector every parameter is frozen. ``experts=[...]`` freezes only those expert rows of the
    selected fused experts and router weights. Prints and returns the :class:`TrainableReport`.
    """
    return _set_trainable(model, pattern, kind, layers, experts, False, verbose)


def unfreeze(
    model: nn.Module,
    pattern: str | None = None,
    *,
    kind: str | None = None,
    layers=None,
    experts: Sequence[int] | None = None,
    verbose: bool = True,
) -> TrainableReport:
    """The inverse of :func:`freeze` with the same selectors."""
    return _set_trainable(model, pattern, kind, layers, experts, True, verbose)
