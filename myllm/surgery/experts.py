"""Insert new experts into existing MoE layers (for SFT on new data), with the old experts frozen.

:func:`grow_experts` / :func:`grow_rows` are the pure transforms (fused layout in, fused layout out);
:func:`add_experts` applies them to the MoE blocks of a live model (HF ``qwen2_moe``, ``qwen3_moe``,
``mixtral``, ``deepseek_v3`` blocks and myllm ``moe`` blocks, in HF models or in MyLLM models), atomically, and
records the change (``config.myllm_surgeries``; replayed when the model is rebuilt, so it saves and loads).

Why the model's outputs are unchanged at insertion and the new experts still learn: see
:mod:`myllm.surgery.routing` (old experts keep their exact routing; new experts form a separately routed
group whose output projections start at zero). Why the frozen experts stay bit-identical under any torch
optimizer, AdamW with weight decay included: see :mod:`myllm.surgery.freeze` (gradient rows are masked
*and* the optimizer step is undone on frozen rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from myllm.factory import recipe
from myllm.factory.engine import Journal, check_model_state
from myllm.factory.layout import LayerSelector, LayoutError, slot_targets, target_at
from myllm.surgery import freeze as freezing
from myllm.surgery.routing import with_group

GROW_INITS = ("copy", "random")
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def grow_rows(
    tensor: torch.Tensor,
    n_new: int,
    *,
    init: str = "copy",
    source: Sequence[int] | None = None,
    zero: bool = False,
    seed: int = 0,
    std: float = 0.02,
) -> torch.Tensor:
    """``tensor [E, ...] -> [E + n_new, ...]``: old rows unchanged, new rows copied, random or zero.

    Args:
        init: ``"copy"`` (new row j copies row ``source[j]``, default ``j % E``) or ``"random"`` (``N(0, std)``).
        zero: new rows are zero regardless of ``init``.
    """
    if init not in GROW_INITS:
        raise ValueError(f"unknown init {init!r} for new experts; valid: {', '.join(GROW_INITS)}")
    n_old = tensor.shape[0]
    out = torch.empty((n_old + n_new, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    out[:n_old].copy_(tensor)
    new = out[n_old:]
    if zero:
        new.zero_()
    elif init == "copy":
        src = list(source) if source is not None else [j % n_old for j in range(n_new)]
        new.copy_(tensor[torch.as_tensor(src, device=tensor.device)])
    else:
        g = torch.Generator(device=tensor.device).manual_seed(seed)
        new.normal_(0.0, std, generator=g)
    return out


def grow_experts(
    experts: dict[str, torch.Tensor],
    n_new: int,
    *,
    init: str = "copy",
    zero_output: bool = True,
    source: Sequence[int] | None = None,
    seed: int = 0,
    std: float = 0.02,
) -> dict[str, torch.Tensor]:
    """``{"gate_up_proj": [E, 2I, H], "down_proj": [E, H, I]}`` -> the same with ``E + n_new`` experts.

    New experts' ``gate_up_proj`` are copies (``init="copy"``) or random; their ``down_proj`` is zero when
    ``zero_output`` (the default: the block's output is unchanged), else initialised like ``gate_up_proj``.
    """
    return {
        "gate_up_proj": grow_rows(experts["gate_up_proj"], n_new, init=init, source=source, seed=seed, std=std),
        "down_proj": grow_rows(
            experts["down_proj"], n_new, init=init, source=source, zero=zero_output, seed=seed + 1, std=std
        ),
    }


def moe_parts(block: nn.Module) -> tuple[nn.Module, str, nn.Module, str] | None:
    """``(experts, experts_attr, router, router_attr)`` of an MoE block in the fused layout, else None."""
    experts = getattr(block, "experts", None)
    gate_up = getattr(experts, "gate_up_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3):
        return None
    for attr in ("gate", "router"):
        router = getattr(block, attr, None)
        weight = getattr(router, "weight", None)
        if isinstance(router, nn.Module) and isinstance(weight, torch.Tensor) and weight.shape[0] == gate_up.shape[0]:
            return experts, "experts", router, attr
    return None


def _set_rows(module: nn.Module, name: str, value: torch.Tensor, journal: Journal | None) -> None:
    """Replace parameter/buffer ``module.<name>`` by a new tensor holding ``value``; journaled.

    A new parameter object (not ``.data`` assignment): autograd caches a leaf's shape in its gradient
    accumulator, so a resized leaf that was used in a live graph would fail in backward.
    """
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
        table = module._parameters
    else:
        old = module._buffers[name]
        module._buffers[name] = value
        table = module._buffers
    if journal is not None:
        journal.add(lambda: table.__setitem__(name, old))


def _set_attr(obj: Any, name: str, value: Any, journal: Journal | None) -> None:
    missing = not hasattr(obj, name)
    old = getattr(obj, name, None)
    setattr(obj, name, value)
    if journal is not None:
        journal.add(lambda: delattr(obj, name) if missing else setattr(obj, name, old))


def _grow_block(
    block: nn.Module,
    parts: tuple[nn.Module, str, nn.Module, str],
    n_new: int,
    top_k_new: int,
    *,
    init: str | None,
    seed: int,
    std: float,
    journal: Journal | None,
) -> None:
    """Grow one MoE block by ``n_new`` experts; ``init=None`` is a structural replay (empty tensors)."""
    experts, _, router, router_attr = parts
    n_old = experts.gate_up_proj.shape[0]
    if init is None:

        def grown(t: torch.Tensor, **_: Any) -> torch.Tensor:
            return torch.empty((t.shape[0] + n_new, *t.shape[1:]), dtype=t.dtype, device=t.device)

        new_experts = {k: grown(getattr(experts, k)) for k in ("gate_up_proj", "down_proj")}
        new_router = grown(router.weight)
        for module in (experts, router):  # let post_init()/from_pretrained initialise what is not loaded
            module.__dict__.pop("_is_hf_initialized", None)
    else:
        fused = {k: getattr(experts, k).detach() for k in ("gate_up_proj", "down_proj")}
        new_experts = grow_experts(fused, n_new, init=init, seed=seed, std=std)
        new_router = grow_rows(router.weight.detach(), n_new, init=init, seed=seed + 2, std=std)
    for key, value in new_experts.items():
        _set_rows(experts, key, value, journal)
    for obj in (block, experts):
        for attr in ("num_experts", "n_experts"):
            if getattr(obj, attr, None) == n_old:
                _set_attr(obj, attr, n_old + n_new, journal)
    grown_router = with_group(router, n_new, top_k_new)
    _set_rows(grown_router, "weight", new_router, None)  # the old router object keeps its weight
    old_router = getattr(block, router_attr)
    setattr(block, router_attr, grown_router)
    if journal is not None:
        journal.add(lambda: setattr(block, router_attr, old_router))


def _expert_count_key(config: Any, n_old: int) -> str | None:
    keys = config.to_dict()
    for key in _EXPERT_COUNT_KEYS:
        if keys.get(key) == n_old:
            return key
    return None


def add_experts(
    model: nn.Module,
    n_new: int,
    *,
    layers: LayerSelector = None,
    init: str = "copy",
    freeze_existing: bool = True,
    top_k_new: int = 1,
    seed: int = 0,
) -> nn.Module:
    """Add ``n_new`` experts to MoE layers of ``model`` (in place); returns ``model``.

    Args:
        n_new: experts to add to each chosen MoE layer.
        layers: layer selection as in :func:`myllm.factory.replace`; default every MoE layer. Every chosen
            layer must be an MoE layer.
        init: new experts' ``gate_up_proj`` and router rows: ``"copy"`` (of existing experts, round-robin)
            or ``"random"``. Their ``down_proj`` starts at zero, so the model's outputs are unchanged.
        freeze_existing: freeze the old experts and their router rows (rows of the fused tensors, see
            :mod:`myllm.surgery.freeze`); other parameters are left as they are.
        top_k_new: experts of the new group used per token (in addition to the old top-k).
        seed: seed of the random init.

    Raises:
        LayoutError: a chosen layer has no MoE block, or (HF MoE models, whose load-balancing loss assumes
            one expert count) not every MoE layer is chosen.
        ValueError: ``n_new < 1``, ``top_k_new`` outside ``[1, n_new]``, unknown ``init``.
        SurgeryError: meta or ZeRO-3-partitioned parameters, or a training wrapper.
    """
    if not isinstance(n_new, int) or n_new < 1:
        raise ValueError(f"n_new must be a positive int, got {n_new!r}")
    if not 1 <= top_k_new <= n_new:
        raise ValueError(f"top_k_new must be in [1, n_new={n_new}], got {top_k_new}")
    if init not in GROW_INITS:
        raise ValueError(f"unknown init {init!r} for new experts; valid: {', '.join(GROW_INITS)}")
    check_model_state(model)
    recipe.check_promotable(model)  # MyLLM models record the entry in config.myllm_surgeries, replayed on load
    _, all_targets = slot_targets(model, "ffn", None)
    moe_paths = [t.path for t in all_targets if moe_parts(t.module) is not None]
    if layers is None:
        targets = [t for t in all_targets if t.path in moe_paths]
        if not targets:
            raise LayoutError(f"add_experts: {type(model).__name__} has no MoE layer (only dense FFNs)")
    else:
        _, targets = slot_targets(model, "ffn", layers)
        dense = [f"{t.path} ({type(t.module).__name__})" for t in targets if t.path not in moe_paths]
        if dense:
            raise LayoutError(f"add_experts on a dense layer: {', '.join(dense)} has no experts")
    counts = {moe_parts(t.module)[0].gate_up_proj.shape[0] for t in targets}
    config_updates: dict[str, tuple[int, int]] = {}
    count_key = _expert_count_key(model.config, next(iter(counts))) if len(counts) == 1 else None
    if count_key is not None and {t.path for t in targets} != set(moe_paths):
        raise LayoutError(
            f"{model.config.model_type} keeps one expert count in config.{count_key} (its load-balancing loss "
            f"assumes it); add experts to every MoE layer ({len(moe_paths)}), not {len(targets)}"
        )
    if count_key is not None:
        n_old = next(iter(counts))
        config_updates[count_key] = (n_old, n_old + n_new)
    std = float(getattr(model.config, "initializer_range", 0.02) or 0.02)
    journal = Journal()
    try:
        for t in targets:
            parts = moe_parts(t.module)
            n_old = parts[0].gate_up_proj.shape[0]
            _grow_block(t.module, parts, n_new, top_k_new, init=init, seed=seed, std=std, journal=journal)
            if freeze_existing:
                experts, _, router, _ = moe_parts(t.module)
                for p in (experts.gate_up_proj, router.weight, experts.down_proj):
                    journal.add(freezing.freeze_rows(p, range(n_old)))
        if config_updates and hasattr(model, "num_experts"):
            _set_attr(model, "num_experts", next(iter(config_updates.values()))[1], journal)
        entry = {
            "op": "add_experts",
            "n_new": n_new,
            "targets": [t.path for t in targets],
            "top_k_new": top_k_new,
            "init": init,
            "freeze_existing": freeze_existing,
        }
        journal.add(recipe.record(model, entry, config_updates))
    except BaseException:
        journal.rollback()
        raise
    return model


def freeze_recorded_experts(model: nn.Module) -> dict[str, int]:
    """Freeze again the experts that recorded ``add_experts(..., freeze_existing=True)`` calls froze.

    Row freezing lives on the live parameters and is not saved (see :mod:`myllm.surgery.freeze`); a grown
    model loaded from disk calls this before training so its old experts stay frozen. Each entry froze the
    rows that existed before it (the original experts and earlier groups).

    Returns:
        ``{MoE block path: number of frozen expert rows}`` (empty when nothing was recorded frozen).
    """
    entries = [e for e in recipe.surgeries(model.config) if e.get("op") == "add_experts"]
    added: dict[str, int] = {}
    for entry in entries:
        for path in entry["targets"]:
            added[path] = added.get(path, 0) + entry["n_new"]
    grown_so_far = dict.fromkeys(added, 0)
    frozen: dict[str, int] = {}
    for entry in entries:
        for path in entry["targets"]:
            experts, _, router, _ = moe_parts(target_at(model, path).module)
            n_old = experts.gate_up_proj.shape[0] - added[path] + grown_so_far[path]
            grown_so_far[path] += entry["n_new"]
            if entry.get("freeze_existing", True):
                for p in (experts.gate_up_proj, router.weight, experts.down_proj):
                    freezing.freeze_rows(p, range(n_old))
                frozen[path] = max(frozen.get(path, 0), n_old)
    return frozen


@recipe.recipe_op("add_experts")
def replay_add_experts(model: nn.Module, entry: dict[str, Any]) -> None:
    """Structural replay: grow the recorded MoE blocks (empty tensors; weights come from the checkpoint)."""
    for path in entry["targets"]:
        block = target_at(model, path).module
        parts = moe_parts(block)
        if parts is None:
            raise LayoutError(f"recipe add_experts: {path} is not an MoE block ({type(block).__name__})")
        _grow_block(block, parts, entry["n_new"], entry["top_k_new"], init=None, seed=0, std=0.0, journal=None)
    updates = entry.get("config_updates") or {}
    if updates and hasattr(model, "num_experts"):
        model.num_experts = next(iter(updates.values()))[1]
