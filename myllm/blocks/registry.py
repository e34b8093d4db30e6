"""One registry for every kind of interchangeable block.

A block is registered under a ``(kind, name)`` pair together with a pydantic config class. The config
is the single source of truth for the block's keyword arguments: :func:`build` validates the keywords
through it (unknown, mistyped or out-of-range values raise :class:`pydantic.ValidationError` naming the
field) and then calls the block's keyword-only constructor with the validated values.

Kinds are fixed (:data:`KINDS`); names are open, so later modules add blocks (``moe``, ``moba``,
``mla``, ``latent`` ...) by decorating their class, without touching this file::

    class SwiGLUConfig(BlockConfig):
        hidden_size: PositiveInt
        intermediate_size: PositiveInt

    @register("ffn", "dense", config=SwiGLUConfig)
    class SwiGLU(nn.Module):
        def __init__(self, *, hidden_size: int, intermediate_size: int): ...

    myllm.blocks.build("ffn", "dense", hidden_size=64, intermediate_size=128)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

KINDS: tuple[str, ...] = ("attention", "ffn", "norm", "cache")

T = TypeVar("T")


class BlockConfig(BaseModel):
    """Base class of every block config: unknown keywords are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)


class RegistryError(KeyError):
    """An unknown kind or block name, or a duplicate registration. The message lists what is valid."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly instead
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class BlockSpec:
    """What the registry knows about one block: its kind, name, class (or factory) and config class."""

    kind: str
    name: str
    builder: Callable[..., Any]
    config: type[BlockConfig]
    example: Callable[[], dict[str, Any]] | None = None

    def validate(self, **kwargs: Any) -> BlockConfig:
        """Validate keyword arguments without building anything (raises ``pydantic.ValidationError``)."""
        return self.config(**kwargs)

    def build(self, **kwargs: Any) -> Any:
        """Validate ``kwargs`` and build the block with the validated values."""
        cfg = self.validate(**kwargs)
        return self.builder(**dict(cfg))


_BLOCKS: dict[str, dict[str, BlockSpec]] = {kind: {} for kind in KINDS}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _check_kind(kind: str) -> dict[str, BlockSpec]:
    if kind not in _BLOCKS:
        raise RegistryError(f"unknown block kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return _BLOCKS[kind]


def register(
    kind: str,
    name: str,
    *,
    config: type[BlockConfig],
    example: Callable[[], dict[str, Any]] | None = None,
    override: bool = False,
) -> Callable[[T], T]:
    """Class (or factory function) decorator that registers a block under ``(kind, name)``.

    Args:
        kind: one of :data:`KINDS`.
        name: the block's name within its kind (case-insensitive, ``-`` and ``_`` are the same).
        config: pydantic model whose fields are exactly the constructor's keyword arguments.
        example: returns keyword arguments of a tiny valid instance; the registry-wide smoke tests
            build every block from it, so every block should give one.
        override: replace an existing registration instead of raising.

    Raises:
        RegistryError: unknown kind, or ``name`` already registered for ``kind`` and ``override`` is false.
        TypeError: ``config`` is not a :class:`BlockConfig` subclass.
    """
    table = _check_kind(kind)
    if not (isinstance(config, type) and issubclass(config, BlockConfig)):
        raise TypeError(f"config for {kind}/{name} must be a BlockConfig subclass, got {config!r}")
    key = _normalise(name)

    def decorator(builder: T) -> T:
        if key in table and not override:
            raise RegistryError(
                f"{kind} block {key!r} is already registered (by {table[key].builder!r}); pass override=True to replace it"
            )
        table[key] = BlockSpec(kind=kind, name=key, builder=builder, config=config, example=example)  # type: ignore[arg-type]
        return builder

    return decorator


def unregister(kind: str, name: str) -> BlockSpec:
    """Remove and return the registration of ``(kind, name)`` (e.g. a block a test registered temporarily)."""
    table = _check_kind(kind)
    spec = get(kind, name)
    del table[spec.name]
    return spec


def get(kind: str, name: str) -> BlockSpec:
    """The :class:`BlockSpec` of ``(kind, name)``; raises :class:`RegistryError` listing valid names."""
    table = _check_kind(kind)
    key = _normalise(name) if isinstance(name, str) else name
    if key not in table:
        raise RegistryError(
            f"unknown {kind} block {name!r}; available {kind} blocks: {', '.join(sorted(table)) or '(none)'}"
        )
    return table[key]


def available(kind: str) -> list[str]:
    """Sorted names of the blocks registered for ``kind``."""
    return sorted(_check_kind(kind))


def build(kind: str, name: str, **kwargs: Any) -> Any:
    """Build block ``name`` of ``kind`` from validated keyword arguments."""
    return get(kind, name).build(**kwargs)


def validate(kind: str, name: str, **kwargs: Any) -> BlockConfig:
    """Validate keyword arguments for a block without building it."""
    return get(kind, name).validate(**kwargs)


def specs(kind: str | None = None) -> list[BlockSpec]:
    """All registered specs (of one kind, or of every kind), e.g. for tests parametrized over the registry."""
    kinds = KINDS if kind is None else (kind,)
    return [spec for k in kinds for _, spec in sorted(_check_kind(k).items())]
