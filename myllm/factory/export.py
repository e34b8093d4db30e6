"""Export a surgically changed model to a native transformers architecture, when one represents it exactly.

``myllm.factory.export(model, out_dir)`` writes a checkpoint that plain transformers loads *without*
myllm (and so do serving engines that know the architecture). Native targets:

| base model            | changed FFNs                                 | native target          |
| --------------------- | -------------------------------------------- | ---------------------- |
| ``llama``, ``mistral`` | every layer a ``moe`` block                  | ``MixtralForCausalLM`` |
| ``qwen3``             | ``moe`` blocks (dense layers allowed)        | ``Qwen3MoeForCausalLM`` (dense layers in ``mlp_only_layers``) |
| ``qwen2``             | ``moe`` blocks with one gated shared expert  | ``Qwen2MoeForCausalLM`` (dense layers in ``mlp_only_layers``) |
| any tabled type       | no MoE change                                | the base architecture itself |

The ``moe`` blocks must all have the same configuration, and one the target's router expresses (checked by
:func:`myllm.blocks.ffn.moe.hf.hf_config_from_moe_kwargs`: e.g. Mixtral needs softmax top-k with
renormalisation, no temperature, no shared experts). Attention may be HF's or myllm's ``eager``/``sdpa``
with the target's biases and q/k norms; norms HF's or myllm's ``rmsnorm`` (pre-norm). Anything else
(MoBA, MLA, layernorm/deepnorm, added expert groups, ``coe``) has no native target: a clear error names
the module. Tensors are handed over without copies; the target's ``save_pretrained`` writes its usual
checkpoint format. The directory is written atomically.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from myllm.factory.layout import base_model_type, resolve_layout, slot_targets
from myllm.factory.postnorm import is_post_norm_layer
from myllm.factory.recipe import RECIPE_KEY, RecipeError

MOE_TARGETS = {"llama": "mixtral", "mistral": "mixtral", "qwen3": "qwen3_moe", "qwen2": "qwen2_moe"}
_DENSE_LAYERS_ALLOWED = {"qwen3_moe", "qwen2_moe"}


class ExportError(RecipeError):
    """The model has no exact native representation."""


def _is_dense(module: nn.Module) -> bool:
    lins = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return all(isinstance(lin, nn.Linear) and lin.bias is None for lin in lins) and not hasattr(module, "experts")


def _check_attention_and_norms(model: nn.Module) -> None:
    from myllm.blocks.attention import Attention
    from myllm.blocks.norm import RMSNorm

    for t in slot_targets(model, "attention")[1]:
        if isinstance(t.module, Attention) and type(t.module).__name__ not in ("EagerAttention", "SdpaAttention"):
            raise ExportError(f"{t.path} ({type(t.module).__name__}) has no native counterpart")
    for t in slot_targets(model, "norm")[1]:
        if type(t.module).__module__.startswith("myllm") and not isinstance(t.module, RMSNorm):
            raise ExportError(f"{t.path} ({type(t.module).__name__}) has no native counterpart")
    layers = model.get_submodule(resolve_layout(model).layers)
    if any(is_post_norm_layer(layer) for layer in layers):
        raise ExportError("post-norm (deepnorm) layers have no native counterpart")


def _moe_plan(model: nn.Module) -> tuple[dict[str, Any] | None, list[int]]:
    """(shared ``moe`` kwargs or None, indices of dense layers); raises for FFNs without a native form."""
    configs, dense = [], []
    for t in slot_targets(model, "ffn")[1]:
        module = t.module
        if getattr(type(module), "is_moe", False) and type(module).__name__ == "MoE":
            if hasattr(type(module.gate), "_myllm_base_router_class"):
                raise ExportError(f"{t.path} has added expert groups (add_experts), which no HF router expresses")
            configs.append(dict(module.block_config))
        elif _is_dense(module):
            dense.append(t.layer_idx)
        else:
            raise ExportError(f"{t.path} ({type(module).__name__}) has no native counterpart")
    if not configs:
        return None, dense
    if any(c != configs[0] for c in configs):
        raise ExportError("the moe blocks differ between layers; a native config holds one MoE configuration")
    return configs[0], dense


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def native_config(model: nn.Module) -> tuple[Any, str]:
    """The native config of ``model`` and its ``model_type`` (raises :class:`ExportError` when none)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    base = base_model_type(model)
    _check_attention_and_norms(model)
    moe, dense = _moe_plan(model)
    source = {k: v for k, v in model.config.to_dict().items() if k not in (RECIPE_KEY, "model_type", "architectures")}
    if moe is None:
        target = base
        fields: dict[str, Any] = {}
    else:
        from myllm.blocks.ffn.moe.hf import hf_config_from_moe_kwargs

        if base not in MOE_TARGETS:
            raise ExportError(f"no native MoE architecture for {base}; supported: {', '.join(sorted(MOE_TARGETS))}")
        target = MOE_TARGETS[base]
        if dense and target not in _DENSE_LAYERS_ALLOWED:
            raise ExportError(f"{target} has no dense layers; layers {dense} are still dense")
        if target == "mixtral" and (source.get("attention_bias") or source.get("mlp_bias")):
            raise ExportError("Mixtral has no attention/MLP biases")
        try:
            fields = hf_config_from_moe_kwargs(target, moe)
        except ValueError as exc:
            raise ExportError(str(exc)) from exc
        if target in _DENSE_LAYERS_ALLOWED:
            fields.update(decoder_sparse_step=1, mlp_only_layers=dense)
    cfg_cls = CONFIG_MAPPING[target]
    names = _field_names(cfg_cls)
    kwargs = {k: v for k, v in source.items() if k in names and k not in fields}
    kwargs.update(fields)
    return cfg_cls(**kwargs), target


def _native_state(model: nn.Module, target: str) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if target == "qwen2_moe":
        from myllm.blocks.ffn.moe.hf import moe_state_dict_to_hf

        renamed = {}
        for key, value in state.items():
            prefix, sep, rest = key.partition(".mlp.")
            if sep and rest.startswith("shared_experts."):
                key = prefix + sep + next(iter(moe_state_dict_to_hf(target, {rest: value})))
            renamed[key] = value
        state = renamed
    return state


def export(model: nn.Module, out_dir: str | os.PathLike) -> str:
    """Write ``model`` as a native transformers checkpoint at ``out_dir``; returns the target ``model_type``.

    Raises:
        ExportError: no native architecture represents the model exactly (the message names the module).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config, target = native_config(model)
    state = _native_state(model, target)
    with torch.device("meta"):
        native = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    missing, unexpected = native.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(native, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ExportError(f"state dict does not map onto {target}: missing {missing[:6]}, unexpected {unexpected[:6]}")
    out = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".myllm-export-", dir=parent)
    try:
        native.save_pretrained(tmp)
        from myllm.data.io import replace_dir  # (the data package is not needed before a write)

        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
