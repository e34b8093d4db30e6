"""The recorded recipe: what makes a surgically changed HF model save and load as itself.

Every successful :func:`myllm.factory.replace` / :func:`myllm.surgery.add_experts` appends one JSON entry to
``config.myllm_surgeries`` and *promotes* the model to a registered ``myllm_<base>`` type:

* ``config.__class__`` becomes ``Myllm<Base>Config`` (a subclass of e.g. ``LlamaConfig`` whose only
  difference is ``model_type = "myllm_llama"``), so ``config.json`` says ``"model_type": "myllm_llama"``;
* ``model.__class__`` becomes ``Myllm<Base>ForCausalLM`` (a subclass of e.g. ``LlamaForCausalLM``), so
  ``"architectures"`` names it. Both swaps touch only this instance; the base classes are never modified.

``Myllm<Base>ForCausalLM.__init__`` builds the base structure, replays the recipe structurally (no weight
reads; on the meta device inside ``from_pretrained``) and calls ``post_init()`` again, so
``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds exactly the saved structure and loads every tensor by
key (no missing, no unexpected keys). The classes are registered with ``AutoConfig`` /
``AutoModelForCausalLM`` when myllm is imported (for the architectures in the slot table; others on first
use, or with :func:`register_base`). Without myllm, transformers rejects the unknown ``myllm_*`` model type:
loading fails loudly and never re-initialises weights silently.

Entry format (``config.json``)::

    "myllm_surgeries": [
      {"op": "replace", "kind": "ffn", "name": "moe", "layers": [0, 1],
       "targets": ["model.layers.0.mlp", "model.layers.1.mlp"],
       "kwargs": {"hidden_size": 32, "intermediate_size": 64, "n_experts": 4, "top_k": 2, ...},
       "per_target": {"model.layers.1.mlp": {"layer_idx": 1}},
       "options": {"init": "copy"}, "myllm_version": "0.1.0"},
      {"op": "add_experts", "n_new": 2, "layers": [0, 1], "top_k_new": 1, ...,
       "config_updates": {"num_local_experts": [4, 6]}, "myllm_version": "0.1.0"}
    ]

MyLLM models record ``replace`` in their block specs instead (:mod:`myllm.factory.myllm_model`); only
``add_experts``, which the specs cannot express, goes to ``MyLLMConfig.myllm_surgeries`` and is replayed by
``MyLLMForCausalLM.__init__``.

``kwargs`` are the fully resolved block keywords (sizes included), so a replay never re-derives anything;
``config_updates`` lists config values an op changed (``[before, after]``), which ``__init__`` temporarily
reverts while the base class builds its original structure.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from myllm.blocks.ffn.moe.router import init_router_state

RECIPE_KEY = "myllm_surgeries"
PREFIX = "myllm_"

_MISSING = object()
_OPS: dict[str, Callable[[nn.Module, dict[str, Any]], None]] = {}
_REGISTERED: dict[str, tuple[type, type]] = {}


class RecipeError(ValueError):
    """A recipe cannot be recorded or replayed."""


def recipe_op(name: str) -> Callable[[Callable], Callable]:
    """Register the structural replay function of recipe entries with ``"op": name``."""

    def decorator(fn: Callable) -> Callable:
        _OPS[name] = fn
        return fn

    return decorator


def surgeries(config: Any) -> list[dict[str, Any]]:
    """The recorded entries of a config (a copy; empty when none)."""
    return [dict(e) for e in (getattr(config, RECIPE_KEY, None) or [])]


def myllm_version() -> str:
    from myllm import __version__

    return __version__


@contextlib.contextmanager
def _as_originally_built(config: Any, entries: list[dict[str, Any]]) -> Iterator[None]:
    """Temporarily revert the config values recorded ops changed, so the base class builds the original."""
    current: dict[str, Any] = {}
    for entry in reversed(entries):
        for key, (before, _after) in (entry.get("config_updates") or {}).items():
            current.setdefault(key, getattr(config, key))
            setattr(config, key, before)
    try:
        yield
    finally:
        for key, value in current.items():
            setattr(config, key, value)


def replay(model: nn.Module, entries: list[dict[str, Any]] | None = None) -> None:
    """Re-apply recorded entries structurally (no weights are read or moved)."""
    for entry in surgeries(model.config) if entries is None else entries:
        op = entry.get("op", "replace")
        if op not in _OPS:
            raise RecipeError(f"unknown recipe op {op!r} (written by myllm {entry.get('myllm_version', '?')}?)")
        _OPS[op](model, entry)


def _aux_loss_terms(model: nn.Module, attention_mask: Any) -> list[Any]:
    return [
        m.aux_loss(attention_mask)
        for m in model.modules()
        if getattr(m, "is_moe", False) and callable(getattr(m, "aux_loss", None))
    ]


def _make_model_class(base_model: type, cfg_cls: type) -> type:
    def __init__(self, config):
        with _as_originally_built(config, surgeries(config)):
            base_model.__init__(self, config)
        replay(self)
        self.post_init()

    @functools.wraps(base_model.forward)
    def forward(self, *args, **kwargs):
        """The base forward; with ``labels``, the balancing losses of myllm MoE blocks are added to the loss."""
        out = base_model.forward(self, *args, **kwargs)
        loss = out.get("loss") if isinstance(out, dict) else (out[0] if kwargs.get("labels") is not None else None)
        if kwargs.get("labels") is None or loss is None:
            return out
        terms = _aux_loss_terms(self, kwargs.get("attention_mask"))
        if not terms:
            return out
        total = loss + sum(t.to(loss.device) for t in terms)
        if isinstance(out, dict):
            out["loss"] = total
            return out
        return (total, *out[1:])

    def from_pretrained(cls, *args, **kwargs):
        """``from_pretrained`` that refuses missing, unexpected or mismatched keys (never re-initialises silently)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super(model_cls, cls).from_pretrained(*args, output_loading_info=True, **kwargs)
        bad = {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
        if bad:
            raise RecipeError(f"the checkpoint does not match the recorded structure of {cls.__name__}: {bad}")
        # state of myllm blocks that is not saved (router load counters): transformers leaves it uninitialised,
        # and the base class's _init_weights (which initialises the inner model's modules) does not know it
        for module in model.modules():
            init_router_state(module)
        return (model, info) if want_info else model

    model_cls = type(
        f"Myllm{base_model.__name__}",
        (base_model,),
        {
            "config_class": cfg_cls,
            "__init__": __init__,
            "forward": forward,
            "from_pretrained": classmethod(from_pretrained),
            "__module__": __name__,
        },
    )
    return model_cls


def register_base(model_type: str) -> tuple[type, type]:
    """Create (once) and register ``Myllm<Base>Config`` / ``Myllm<Base>ForCausalLM`` for a base model type.

    Call it before ``from_pretrained`` for an architecture outside the slot table that was changed through
    the structural fallback (the tabled ones are registered when myllm is imported).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    base_type = model_type[len(PREFIX) :] if model_type.startswith(PREFIX) else model_type
    if base_type in _REGISTERED:
        return _REGISTERED[base_type]
    try:
        base_cfg = CONFIG_MAPPING[base_type]
        base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_cfg]
    except KeyError as exc:
        raise RecipeError(f"model type {base_type!r} has no causal-LM class registered with transformers") from exc
    cfg_cls = type(
        f"Myllm{base_cfg.__name__}",
        (base_cfg,),
        {"model_type": PREFIX + base_type, "myllm_base_model_type": base_type, "__module__": __name__},
    )
    model_cls = _make_model_class(base_model, cfg_cls)
    globals()[cfg_cls.__name__] = cfg_cls  # importable by name (pickling, deepcopy of configs)
    globals()[model_cls.__name__] = model_cls
    AutoConfig.register(PREFIX + base_type, cfg_cls, exist_ok=True)
    AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
    _REGISTERED[base_type] = (cfg_cls, model_cls)
    return cfg_cls, model_cls


def is_promoted(model: nn.Module) -> bool:
    return getattr(type(getattr(model, "config", None)), "myllm_base_model_type", None) is not None


def check_promotable(model: nn.Module) -> None:
    """Raise (before any change) when a surgery on ``model`` could not be recorded for save/load."""
    if is_promoted(model) or getattr(getattr(model, "config", None), "model_type", None) == "myllm":
        return
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise RecipeError(f"{type(model).__name__} has no transformers config; the surgery could not be recorded")
    _, model_cls = register_base(config.model_type)
    base = model_cls.__mro__[1]
    if type(model) is not base:
        raise RecipeError(
            f"surgery is recorded on causal-LM models ({base.__name__}); got {type(model).__name__}. "
            f"Load the model with AutoModelForCausalLM."
        )


def promote(model: nn.Module) -> Callable[[], None]:
    """Turn ``model`` (and its config) into the registered ``myllm_<base>`` classes; returns the undo."""
    if is_promoted(model) or model.config.model_type == "myllm":
        return lambda: None
    check_promotable(model)
    cfg_cls, model_cls = register_base(model.config.model_type)
    old_cfg_cls, old_model_cls = type(model.config), type(model)
    model.config.__class__ = cfg_cls
    model.__class__ = model_cls
    # a config read from config.json also holds model_type as an instance attribute
    instance_type = model.config.__dict__.get("model_type", _MISSING)
    if instance_type is not _MISSING:
        model.config.model_type = cfg_cls.model_type
    # A model loaded by from_pretrained remembers the checkpoint key conversions of its base type (e.g. the
    # per-expert legacy layout of Mixtral/Qwen-MoE) and save_pretrained would write that layout back. The
    # myllm_<base> type has no conversion mapping, so its checkpoints hold the in-memory (v5 fused) layout.
    conversions = model.__dict__.pop("_weight_conversions", _MISSING)

    def undo() -> None:
        model.config.__class__ = old_cfg_cls
        model.__class__ = old_model_cls
        if instance_type is not _MISSING:
            model.config.model_type = instance_type
        if conversions is not _MISSING:
            model._weight_conversions = conversions

    return undo


def record(model: nn.Module, entry: dict[str, Any], config_updates: dict[str, tuple[Any, Any]] | None = None):
    """Append ``entry`` to the recipe (promoting the model), apply ``config_updates``; returns the undo."""
    config = model.config
    previous = getattr(config, RECIPE_KEY, _MISSING)
    old_values = {k: getattr(config, k, _MISSING) for k in (config_updates or {})}
    undo_promote = promote(model)
    entry = {**entry, "myllm_version": myllm_version()}
    if config_updates:
        entry["config_updates"] = {k: [v[0], v[1]] for k, v in config_updates.items()}
        for key, (_before, after) in config_updates.items():
            setattr(config, key, after)
    setattr(config, RECIPE_KEY, surgeries(config) + [entry])

    def undo() -> None:
        for key, value in old_values.items():
            if value is _MISSING:
                delattr(config, key)
            else:
                setattr(config, key, value)
        if previous is _MISSING:
            delattr(config, RECIPE_KEY)
        else:
            setattr(config, RECIPE_KEY, previous)
        undo_promote()

    return undo


TABLED_BASES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3")


def register_tabled_bases() -> None:
    """Register ``myllm_<base>`` for every HF architecture in the slot table (called on ``import myllm``)."""
    for base in TABLED_BASES:
        register_base(base)
