"""How trained weights move from a replaced module into its replacement.

A :class:`Mover` handles one kind of transition (same parameters under the same names; norms; dense -> MoE
upcycling; MoE -> MoE with the experts kept ...). :func:`select_mover` walks :data:`MOVERS` and returns the
first one that accepts the pair (PEFT's dispatcher idiom); when none does, the error lists why each
candidate refused, so a caller sees e.g. which attention weights do not fit the new block.

Life cycle inside :func:`myllm.factory.replace` (nothing is changed before every target passed ``check``):

1. ``check(old, spec, kwargs, options) -> kwargs``: validate, possibly adjust block kwargs (e.g. split
   experts are ``1/E`` of the dense width); raise :class:`MoveError` on a misfit.
2. ``build(spec, kwargs, old)``: the new module (default: built for real in ``old``'s dtype and device).
3. ``fill(old, new, options)``: move the weights.
4. optional ``restore(old, new)``: rebuild ``old``'s tensors exactly from ``new`` after the engine released
   them to save memory (``invertible = True``); a mover that shares ``old``'s parameters needs no release.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from myllm.blocks.registry import BlockSpec


class MoveError(ValueError):
    """The replaced module's weights cannot move into the requested block."""


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily make ``dtype`` torch's default floating dtype (what ``from_pretrained(dtype=...)`` does)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_block(
    spec: BlockSpec, kwargs: dict[str, Any], *, dtype: torch.dtype, device: torch.device | str
) -> nn.Module:
    """Build a registry block directly on ``device`` with ``dtype`` as the default floating dtype."""
    with torch.device(device), default_dtype(dtype):
        return spec.build(**kwargs)


def tensor_shapes(module: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{state-dict key: (shape, dtype)}`` of a module (works on the meta device)."""
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict(keep_vars=True).items()}


def share_parameters(old: nn.Module, new: nn.Module, names: set[str]) -> None:
    """Make ``new`` use ``old``'s parameter/buffer objects for ``names`` (no copy, same identity)."""
    for name in names:
        mod_path, _, leaf = name.rpartition(".")
        src = old.get_submodule(mod_path) if mod_path else old
        dst = new.get_submodule(mod_path) if mod_path else new
        if leaf in src._parameters:
            dst._parameters[leaf] = src._parameters[leaf]
        else:
            dst._buffers[leaf] = src._buffers[leaf]


class Mover(abc.ABC):
    """Base mover: build for real, nothing moved. Subclasses override :meth:`accepts` and :meth:`fill`."""

    name = "base"
    kinds: tuple[str, ...] = ()
    options: frozenset[str] = frozenset()
    invertible = False
    shares = False

    @abc.abstractmethod
    def accepts(self, kind: str, old: nn.Module, spec: BlockSpec, kwargs: dict[str, Any]) -> str | None:
        """``None`` when this mover handles the pair, else the reason it does not (shown in errors)."""

    def check(
        self, old: nn.Module, spec: BlockSpec, kwargs: dict[str, Any], options: dict[str, Any]
    ) -> dict[str, Any]:
        return kwargs

    def build(self, spec: BlockSpec, kwargs: dict[str, Any], old: nn.Module, dtype: torch.dtype, device) -> nn.Module:
        return build_block(spec, kwargs, dtype=dtype, device=device)

    def fill(self, old: nn.Module, new: nn.Module, options: dict[str, Any]) -> None:
        """Move the weights; ``options`` are the caller's surgery options plus ``"_std"`` (the model's init std)."""
        return None

    def is_invertible(self, options: dict[str, Any]) -> bool:
        """Whether :meth:`restore` can rebuild the old tensors exactly for these options."""
        return self.invertible

    def restore(self, old: nn.Module, new: nn.Module) -> None:
        raise MoveError(f"mover {self.name} cannot restore released weights")


def _meta_build(spec: BlockSpec, kwargs: dict[str, Any], dtype: torch.dtype | None = None) -> nn.Module:
    with torch.device("meta"), default_dtype(dtype or torch.get_default_dtype()):
        return spec.build(**kwargs)


def meta_buildable(module: nn.Module) -> bool:
    """Whether a meta-built module can be materialised without running its constructor again.

    Non-persistent floating buffers (e.g. RoPE's ``inv_freq``) are computed by constructors and cannot be
    re-created generically; integer ones (statistics) start at zero.
    """
    for mod in module.modules():
        for name in mod._non_persistent_buffers_set:
            buf = mod._buffers.get(name)
            if buf is not None and buf.is_floating_point():
                return False
    return True


@torch.no_grad()
def materialize(
    module: nn.Module,
    device: torch.device | str,
    tensors: dict[str, torch.Tensor],
    *,
    std: float,
    zero: tuple[str, ...] = (),
) -> nn.Module:
    """Give a meta-built module real tensors on ``device``, in place.

    Args:
        tensors: state-dict key -> tensor to use as is (no copy; a ``Parameter`` is reused, so sharing it
            with another module shares the weight).
        std: init of every other weight of 2 or more dims: ``N(0, std)``; 1-D ``weight`` -> ones,
            ``bias`` and buffers -> zeros.
        zero: keys (suffixes) initialised to zeros instead.
    """
    for mod_name, mod in module.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            key = prefix + name
            if key in tensors:
                t = tensors[key]
                mod._parameters[name] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, p.requires_grad)
                continue
            new = torch.empty(p.shape, dtype=p.dtype, device=device)
            if any(key.endswith(z) for z in zero) or name == "bias":
                new.zero_()
            elif p.dim() >= 2:
                new.normal_(0.0, std)
            else:
                new.fill_(1.0)
            mod._parameters[name] = nn.Parameter(new, p.requires_grad)
        for name, b in list(mod._buffers.items()):
            if b is None:
                continue
            key = prefix + name
            mod._buffers[name] = tensors[key] if key in tensors else torch.zeros(b.shape, dtype=b.dtype, device=device)
    return module


class SameStateMover(Mover):
    """The new block has exactly the old module's tensors (names, shapes): share them, no copy.

    Covers attention ``HF *Attention`` <-> ``eager``/``sdpa`` (q/k/v/o projections, biases, q/k norms) and any
    other like-for-like swap (``LlamaMLP`` -> ``dense``).
    """

    name = "same-state"
    kinds = ("attention", "ffn", "norm")
    shares = True

    def accepts(self, kind, old, spec, kwargs):
        try:
            new = _meta_build(spec, kwargs)
        except Exception as exc:  # validation errors surface later with the full message
            return f"cannot build {spec.kind}/{spec.name}: {exc}"
        if kind == "attention" and not getattr(new, "takes_sliding_window_mask", True):
            from myllm.surgery.attention import sliding_window_of  # (myllm.surgery imports the factory)

            window = sliding_window_of(old)
            if window is not None:
                return f"{type(old).__name__} attends through a sliding window ({window}), which {spec.name} cannot"
        want, have = tensor_shapes(new), tensor_shapes(old)
        if {k: v[0] for k, v in want.items()} == {k: v[0] for k, v in have.items()}:
            return None
        missing = sorted(set(want) - set(have))
        unexpected = sorted(set(have) - set(want))
        wrong = sorted(k for k in set(want) & set(have) if want[k][0] != have[k][0])
        parts = [
            f"{label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
            for label, keys in (("missing", missing), ("not used", unexpected), ("shape differs", wrong))
            if keys
        ]
        return f"the weights of {type(old).__name__} do not fit {spec.kind}/{spec.name} ({'; '.join(parts)})"

    def fill(self, old, new, options):
        share_parameters(old, new, set(tensor_shapes(new)))


class NormMover(Mover):
    """Norm -> norm: parameters whose name and shape match are shared; new ones keep their init.

    ``rmsnorm -> layernorm`` keeps the gain (the new bias starts at zero); ``layernorm -> rmsnorm`` drops the
    bias (RMSNorm has none). ``deepnorm`` is a post-norm LayerNorm: the factory also switches the decoder
    layer to post-norm residuals (see :mod:`myllm.factory.postnorm`).
    """

    name = "norm"
    kinds = ("norm",)
    shares = True

    def accepts(self, kind, old, spec, kwargs):
        if kind != "norm":
            return "not a norm slot"
        if not isinstance(getattr(old, "weight", None), nn.Parameter):
            return f"{type(old).__name__} has no weight"
        return None

    def fill(self, old, new, options):
        want, have = tensor_shapes(new), tensor_shapes(old)
        share_parameters(old, new, {k for k in want if k in have and have[k] == want[k]})


# First match wins; more specific movers are inserted before the generic ones (see register_mover).
MOVERS: list[Mover] = [SameStateMover(), NormMover()]


def register_mover(mover: Mover, *, first: bool = True) -> Mover:
    """Add a mover to the chain (at the front by default, so it is tried before the generic ones)."""
    MOVERS.insert(0 if first else len(MOVERS), mover)
    return mover


def select_mover(kind: str, old: nn.Module, spec: BlockSpec, kwargs: dict[str, Any], options: dict[str, Any]) -> Mover:
    """The first mover that accepts ``old -> spec`` and every given surgery option."""
    reasons = []
    for mover in MOVERS:
        if kind not in mover.kinds:
            continue
        why = mover.accepts(kind, old, spec, kwargs)
        if why is None:
            extra = set(options) - mover.options
            if extra:
                reasons.append(f"{mover.name}: does not take {', '.join(sorted(extra))}")
                continue
            return mover
        reasons.append(f"{mover.name}: {why}")
    detail = "; ".join(reasons) or "no mover handles this kind"
    raise MoveError(f"cannot replace {type(old).__name__} with {kind}/{spec.name}: {detail}")
