"""Recording a replace on a MyLLM model: the block specs in its config *are* the recipe.

``MyLLMForCausalLM`` builds every layer from ``MyLLMConfig`` block specs (``config.attention``/``ffn``/``norm``
for every layer, ``config.layer_overrides[str(i)][slot]`` per layer). So instead of a ``myllm_surgeries``
entry, a replace rewrites those specs: the new block's name plus the keywords that differ both from what the
config derives (``DERIVED_KWARGS``, sizes) and from the block's defaults. When every layer ends up with the
same spec it becomes the slot's model-level spec and the per-layer overrides are dropped. ``save_pretrained``
/ ``from_pretrained`` then rebuild the changed model with no extra machinery.

Norms: a MyLLM decoder layer wires its residuals from its norms' ``placement`` / ``residual_alpha`` when it is
built, and the final norm is an ``Identity`` under post-norm layers; both are updated on the live model here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

MODEL_TYPE = "myllm"


def is_myllm(model: nn.Module) -> bool:
    return getattr(type(getattr(model, "config", None)), "model_type", None) == MODEL_TYPE


def block_spec(config: Any, kind: str, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The spec ``{"name", **kwargs}`` that makes ``config`` build block ``name`` with ``kwargs``."""
    from myllm.blocks import registry
    from myllm.models.configuration import DERIVED_KWARGS

    fields = registry.get(kind, name).config.model_fields
    derived = DERIVED_KWARGS[kind](config)
    spec: dict[str, Any] = {"name": name}
    for key, value in kwargs.items():
        if key == "layer_idx" or derived.get(key, object()) == value:
            continue
        if key in fields and not fields[key].is_required() and fields[key].default == value:
            continue
        spec[key] = copy.deepcopy(value)
    return spec


def update_specs(model: nn.Module, kind: str, new_specs: dict[int, dict[str, Any]], final_norm: bool) -> Callable:
    """Write per-layer specs (and, for norms, the model-level one) into the MyLLM config; returns the undo.

    Raises:
        ValueError: the resulting config does not validate (the previous specs are restored first).
    """
    config = model.config
    saved = (copy.deepcopy(getattr(config, kind)), copy.deepcopy(config.layer_overrides))

    def undo() -> None:
        setattr(config, kind, saved[0])
        config.layer_overrides = saved[1]

    n = config.num_hidden_layers
    effective = {i: copy.deepcopy(config.block_spec(kind, i)) for i in range(n)}
    effective.update(new_specs)
    model_level = getattr(config, kind)
    if final_norm:
        model_level = next(iter(new_specs.values()))
    elif len(new_specs) == n and all(s == effective[0] for s in effective.values()):
        model_level = effective[0]
    overrides = copy.deepcopy(config.layer_overrides)
    for i, spec in effective.items():
        slots = overrides.setdefault(str(i), {})
        if spec == model_level:
            slots.pop(kind, None)
        else:
            slots[kind] = spec
        if not slots:
            overrides.pop(str(i))
    try:
        setattr(config, kind, model_level)
        config.layer_overrides = overrides
        config.validate_blocks()
    except BaseException:
        undo()
        raise
    return undo


def rewire_norms(model: nn.Module, layers: list[int], journal: Any) -> None:
    """Residual wiring of MyLLM decoder layers whose norms were replaced (journaled)."""
    from myllm.models.modeling import RESIDUALS

    for i in layers:
        layer = model.model.layers[i]
        norm = layer.input_layernorm
        for attr, value in (("residual", RESIDUALS[norm.placement]), ("residual_alpha", float(norm.residual_alpha))):
            old = getattr(layer, attr)
            setattr(layer, attr, value)
            journal.add(lambda layer=layer, attr=attr, old=old: setattr(layer, attr, old))


def final_norm_module(model: nn.Module, old: nn.Module) -> nn.Module:
    """The final norm the updated config calls for (``Identity`` under post-norm), sharing ``old``'s gain."""
    from myllm.blocks import registry
    from myllm.factory.context import module_dtype_device
    from myllm.factory.movers import build_block, share_parameters, tensor_shapes

    name, kwargs = model.config.resolve_block("norm")
    spec = registry.get("norm", name)
    if getattr(spec.builder, "placement", "pre") != "pre":
        return nn.Identity()
    dtype, device = module_dtype_device(old, model)
    new = build_block(spec, kwargs, dtype=dtype, device=device)
    have, want = tensor_shapes(old), tensor_shapes(new)
    share_parameters(old, new, {k for k in want if k in have and have[k] == want[k]})
    return new
