"""Where blocks live inside a model: slot tables per architecture, a structural fallback, target selection.

A :class:`Layout` names the decoder-layer list and, inside one decoder layer, the child module(s) of each
slot kind::

    model.layers[i].self_attn                  -> "attention"
    model.layers[i].mlp                        -> "ffn"
    model.layers[i].input_layernorm,
    model.layers[i].post_attention_layernorm   -> "norm"      (+ the final ``model.norm`` when all layers are chosen)

Every Hugging Face architecture in :data:`SLOT_TABLE` uses this layout; the table is keyed by ``model_type``
(a ``myllm_<base>`` model made by the factory uses its base's entry). A model type that is not in the table
gets a :func:`discover_layout` pass that recognises the common decoder layout (a ``ModuleList`` of decoder
layers, each with an attention child holding ``q/k/v/o_proj`` and an FFN child holding ``gate/up/down_proj``
or fused ``experts``). Anything else is an error that names the supported types and the ``targets=`` escape
hatch (module-path regular expressions, or a predicate on ``(path, module)``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from myllm.blocks.registry import KINDS

SLOT_KINDS: tuple[str, ...] = ("attention", "ffn", "norm")


class LayoutError(ValueError):
    """The model's structure is not understood, or a selection (layers, targets) does not fit it."""


@dataclass(frozen=True)
class Layout:
    """Paths of the replaceable slots of a decoder-only model (relative to the causal-LM module)."""

    layers: str = "model.layers"
    slots: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "attention": ("self_attn",),
            "ffn": ("mlp",),
            "norm": ("input_layernorm", "post_attention_layernorm"),
        }
    )
    final_norm: str | None = "model.norm"

    @property
    def attention(self) -> str:
        return self.slots["attention"][0]

    @property
    def ffn(self) -> str:
        return self.slots["ffn"][0]


LLAMA_LIKE = Layout()

# model_type -> layout. All supported HF decoder families share the Llama layout; what differs between
# them (dense vs MoE FFNs, MLA attention, q/k norms, biases) is read from the modules themselves.
SLOT_TABLE: dict[str, Layout] = {
    name: LLAMA_LIKE
    for name in ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3", "myllm")
}

_ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_FFN_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Target:
    """One module to replace: its dotted path, parent module, attribute name, and decoder-layer index."""

    path: str
    parent: nn.Module
    attr: str
    module: nn.Module
    layer_idx: int


def base_model_type(model: nn.Module) -> str:
    """The architecture's ``model_type`` (``myllm_llama`` -> ``llama``)."""
    config = getattr(model, "config", None)
    base = getattr(config, "myllm_base_model_type", None)
    return base or getattr(config, "model_type", type(model).__name__)


def _is_attention(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, p, None), nn.Module) for p in _ATTN_PROJ)


def _is_ffn(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, p, None), nn.Module) for p in _FFN_PROJ) or hasattr(m, "experts")


def _is_norm(m: nn.Module) -> bool:
    name = type(m).__name__.lower()
    w = getattr(m, "weight", None)
    return ("norm" in name) and isinstance(w, nn.Parameter) and w.dim() == 1


def discover_layout(model: nn.Module) -> Layout | None:
    """Recognise the common decoder layout structurally; ``None`` when it is not there."""
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        first = mod[0]
        children = dict(first.named_children())
        attn = [n for n, c in children.items() if _is_attention(c)]
        ffn = [n for n, c in children.items() if _is_ffn(c)]
        norms = tuple(n for n, c in children.items() if _is_norm(c))
        if len(attn) != 1 or len(ffn) != 1:
            continue
        if not all(
            isinstance(getattr(layer, attn[0], None), nn.Module)
            and isinstance(getattr(layer, ffn[0], None), nn.Module)
            for layer in mod
        ):
            continue
        parent_path = path.rpartition(".")[0]
        parent = model.get_submodule(parent_path) if parent_path else model
        finals = [n for n, c in parent.named_children() if _is_norm(c)]
        final = (f"{parent_path}.{finals[0]}" if parent_path else finals[0]) if len(finals) == 1 else None
        return Layout(layers=path, slots={"attention": (attn[0],), "ffn": (ffn[0],), "norm": norms}, final_norm=final)
    return None


def resolve_layout(model: nn.Module) -> Layout:
    """The slot table entry of the model's architecture, else the structural fallback, else a clear error."""
    mtype = base_model_type(model)
    if mtype in SLOT_TABLE:
        layout = SLOT_TABLE[mtype]
        try:
            model.get_submodule(layout.layers)
        except AttributeError as exc:
            raise LayoutError(
                f"{type(model).__name__} ({mtype}) has no decoder-layer list at {layout.layers!r}"
            ) from exc
        return layout
    layout = discover_layout(model)
    if layout is None:
        raise LayoutError(
            f"model type {mtype!r} ({type(model).__name__}) has no slot table and no recognisable decoder layout "
            f"(a ModuleList of layers with q/k/v/o_proj attention and gate/up/down_proj or experts FFN). "
            f"Supported model types: {', '.join(sorted(SLOT_TABLE))}. "
            f"Pass targets=<module-path regex> to name the modules explicitly."
        )
    return layout


def decoder_layers(model: nn.Module, layout: Layout) -> nn.ModuleList:
    return model.get_submodule(layout.layers)


LayerSelector = int | Sequence[int] | range | Callable[[int], bool] | None


def select_layers(layers: LayerSelector, n_layers: int) -> list[int]:
    """Normalise ``layers=`` (None = all, an index, indices, a range, or a predicate) to sorted indices.

    Negative indices count from the end as in Python. Raises :class:`LayoutError` for out-of-range indices,
    duplicates, an empty selection, or a value of the wrong type.
    """
    if layers is None:
        return list(range(n_layers))
    if callable(layers) and not isinstance(layers, range):
        chosen = [i for i in range(n_layers) if layers(i)]
    else:
        items = [layers] if isinstance(layers, int) else list(layers)  # type: ignore[arg-type]
        chosen = []
        for i in items:
            if isinstance(i, bool) or not isinstance(i, int):
                raise LayoutError(f"layers must be ints, a range or a predicate; got {i!r}")
            if not -n_layers <= i < n_layers:
                raise LayoutError(f"layer {i} is out of range for a model with {n_layers} layers")
            chosen.append(i % n_layers)
        if len(set(chosen)) != len(chosen):
            raise LayoutError(f"layers contains duplicates: {items}")
    if not chosen:
        raise LayoutError("layers selects no layer")
    return sorted(chosen)


_LAYER_IDX = re.compile(r"\.(\d+)(?:\.|$)")


def target_at(model: nn.Module, path: str, layer_idx: int | None = None) -> Target:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    module = getattr(parent, attr)
    if layer_idx is None:
        m = _LAYER_IDX.search("." + path)
        layer_idx = int(m.group(1)) if m else 0
    return Target(path=path, parent=parent, attr=attr, module=module, layer_idx=layer_idx)


def slot_targets(model: nn.Module, kind: str, layers: LayerSelector = None) -> tuple[Layout, list[Target]]:
    """The modules of slot ``kind`` in the selected layers (in layer order)."""
    if kind not in SLOT_KINDS:
        valid = ", ".join(SLOT_KINDS)
        hint = " (caches are not model slots)" if kind in KINDS else ""
        raise LayoutError(f"unknown slot kind {kind!r}{hint}; valid kinds: {valid}")
    layout = resolve_layout(model)
    layer_list = decoder_layers(model, layout)
    chosen = select_layers(layers, len(layer_list))
    names = layout.slots.get(kind, ())
    if not names:
        raise LayoutError(f"{base_model_type(model)} layout has no {kind} slot")
    out = []
    for i in chosen:
        for name in names:
            out.append(target_at(model, f"{layout.layers}.{i}.{name}", i))
    if kind == "norm" and layers is None and layout.final_norm is not None:
        out.append(target_at(model, layout.final_norm, len(layer_list) - 1))
    return layout, out


TargetSpec = str | Sequence[str] | Callable[[str, nn.Module], bool]


def explicit_targets(model: nn.Module, targets: TargetSpec) -> list[Target]:
    """Modules chosen by the ``targets=`` escape hatch.

    Args:
        targets: a regular expression (``re.fullmatch`` on the module path), a list of them, or a predicate
            ``(path, module) -> bool``. A module inside an already chosen one is not chosen again.

    Raises:
        LayoutError: nothing matched.
    """
    if callable(targets):
        pred = targets
    else:
        pats = [targets] if isinstance(targets, str) else list(targets)
        try:
            compiled = [re.compile(p) for p in pats]
        except re.error as exc:
            raise LayoutError(f"bad targets pattern: {exc}") from exc

        def pred(path: str, module: nn.Module) -> bool:
            return any(c.fullmatch(path) for c in compiled)

    chosen: list[str] = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(c + ".") for c in chosen):
            continue
        if pred(path, module):
            chosen.append(path)
    if not chosen:
        raise LayoutError(f"targets={targets!r} matched no module")
    return [target_at(model, p) for p in chosen]


def iter_slot_modules(model: nn.Module, kind: str, layers: LayerSelector = None) -> Iterable[tuple[str, nn.Module]]:
    """``(path, module)`` of every module of slot ``kind`` in the selected layers."""
    _, targets = slot_targets(model, kind, layers)
    return [(t.path, t.module) for t in targets]
