"""Import Hugging Face causal LMs into MyLLM and export them back, through a per-``model_type`` table.

:data:`HF_CONVERTERS` maps an HF ``model_type`` to an :class:`HFConverter`: two config mappings (HF config ->
``MyLLMConfig`` keywords and back) and two pure state-dict transforms (identity for the Llama family, whose
parameter names MyLLM shares). Other modules add architectures with :func:`register_hf_converter`, e.g. the
MoE module adds ``qwen2_moe``/``mixtral``/``deepseek_v3`` with an expert-fusing transform built from
:func:`rename_keys` or a function in ``myllm.surgery``.

``to_hf`` only exports what the target architecture can express: it re-imports the exported config and
requires every layer's resolved blocks to be the same (attention compared up to kernel variants), so a model
with, say, a DeepNorm or a swapped MoE layer fails with a message naming the layer, instead of exporting
silently wrong weights.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import PreTrainedConfig, PreTrainedModel

from myllm.blocks import registry
from myllm.models.configuration import SLOTS, MyLLMConfig
from myllm.models.modeling import MyLLMForCausalLM

StateDict = dict[str, torch.Tensor]


def _identity_state_dict(state_dict: StateDict, config: Any) -> StateDict:
    return dict(state_dict)


@dataclass(frozen=True)
class HFConverter:
    """How one Hugging Face architecture maps onto MyLLM.

    Attributes:
        hf_class: name of the transformers causal-LM class (``"Qwen2ForCausalLM"``), looked up lazily.
        hf_config_class: name of its config class (``"Qwen2Config"``).
        config_to_myllm: HF config -> ``MyLLMConfig`` keywords; raises ``ValueError`` for features MyLLM cannot
            express.
        config_to_hf: ``MyLLMConfig`` -> keywords of ``hf_config_class``.
        state_dict_to_myllm: pure transform of the HF state dict (``(state_dict, hf_config) -> state_dict``).
        state_dict_to_hf: its inverse (``(state_dict, myllm_config) -> state_dict``).
    """

    hf_class: str
    hf_config_class: str
    config_to_myllm: Callable[[PreTrainedConfig], dict[str, Any]]
    config_to_hf: Callable[[MyLLMConfig], dict[str, Any]]
    state_dict_to_myllm: Callable[[StateDict, PreTrainedConfig], StateDict] = field(default=_identity_state_dict)
    state_dict_to_hf: Callable[[StateDict, MyLLMConfig], StateDict] = field(default=_identity_state_dict)


HF_CONVERTERS: dict[str, HFConverter] = {}
"""``model_type`` -> :class:`HFConverter`; extend with :func:`register_hf_converter`."""


def register_hf_converter(model_type: str, converter: HFConverter, *, override: bool = False) -> HFConverter:
    """Add ``converter`` for HF ``model_type``; an existing entry is an error unless ``override``."""
    if model_type in HF_CONVERTERS and not override:
        raise ValueError(f"an HF converter for model_type {model_type!r} is already registered; pass override=True")
    HF_CONVERTERS[model_type] = converter
    return converter


def get_hf_converter(model_type: str | None) -> HFConverter:
    """The converter of ``model_type``; ``ValueError`` listing the supported model types otherwise."""
    if model_type not in HF_CONVERTERS:
        raise ValueError(
            f"no MyLLM converter for model_type {model_type!r}; supported: {', '.join(sorted(HF_CONVERTERS))}"
        )
    return HF_CONVERTERS[model_type]


def rename_keys(rules: list[tuple[str, str]]) -> Callable[[StateDict, Any], StateDict]:
    """A state-dict transform applying ``re.sub(pattern, replacement, key)`` for each rule in order."""
    compiled = [(re.compile(p), r) for p, r in rules]

    def transform(state_dict: StateDict, config: Any) -> StateDict:
        out = {}
        for key, value in state_dict.items():
            for pattern, replacement in compiled:
                key = pattern.sub(replacement, key)
            out[key] = value
        return out

    return transform


# ------------------------------------------------------------------------------------------ Llama family
def common_config_to_myllm(hf: PreTrainedConfig) -> dict[str, Any]:
    """The ``MyLLMConfig`` keywords every Llama-like config shares (sizes, RoPE, norms, tokens, sliding window).

    A ``sliding_window`` without ``layer_types`` (Mistral) makes every layer sliding; ``layer_types`` (Qwen2/3 with
    ``use_sliding_window``) are taken as they are.
    """
    window = getattr(hf, "sliding_window", None)
    types = getattr(hf, "layer_types", None)
    return {
        "sliding_window": window,
        "layer_types": list(types) if types is not None and window is not None else None,
        "vocab_size": hf.vocab_size,
        "hidden_size": hf.hidden_size,
        "intermediate_size": hf.intermediate_size,
        "num_hidden_layers": hf.num_hidden_layers,
        "num_attention_heads": hf.num_attention_heads,
        "num_key_value_heads": hf.num_key_value_heads or hf.num_attention_heads,
        "head_dim": getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        "hidden_act": hf.hidden_act,
        "max_position_embeddings": hf.max_position_embeddings,
        "rope_parameters": copy.deepcopy(hf.rope_parameters),
        "rms_norm_eps": hf.rms_norm_eps,
        "attention_dropout": float(getattr(hf, "attention_dropout", 0.0) or 0.0),
        "initializer_range": hf.initializer_range,
        "tie_word_embeddings": bool(getattr(hf, "tie_word_embeddings", False)),
        "pad_token_id": hf.pad_token_id,
        "bos_token_id": hf.bos_token_id,
        "eos_token_id": hf.eos_token_id,
        "ffn": {"name": "dense"},
        "norm": {"name": "rmsnorm"},
    }


def common_config_to_hf(c: MyLLMConfig) -> dict[str, Any]:
    """The HF config keywords of a Llama-like export (inverse of :func:`common_config_to_myllm`)."""
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": c.hidden_act,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_parameters": copy.deepcopy(c.rope_parameters),
        "rms_norm_eps": c.rms_norm_eps,
        "attention_dropout": c.attention_dropout,
        "initializer_range": c.initializer_range,
        "tie_word_embeddings": c.tie_word_embeddings,
        "pad_token_id": c.pad_token_id,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
    }


def sliding_window_to_hf(c: MyLLMConfig, *, per_layer: bool = True) -> dict[str, Any]:
    """Qwen-family flags of MyLLM's sliding-window layers (``use_sliding_window``, ``sliding_window``, and with
    ``per_layer`` the ``layer_types``; without, the target slides in every layer and the export check refuses a
    mix)."""
    if not c.has_sliding_layers:
        return {"use_sliding_window": False, "sliding_window": None}
    flags = {"use_sliding_window": True, "sliding_window": c.sliding_window}
    return {**flags, "layer_types": list(c.layer_types)} if per_layer else flags


def llama_like_converter(
    hf_class: str,
    hf_config_class: str,
    *,
    attention: Callable[[PreTrainedConfig], dict[str, Any]],
    ffn_bias: Callable[[PreTrainedConfig], bool] = lambda hf: False,
    hf_flags: Callable[[MyLLMConfig], dict[str, Any]] = lambda c: {},
) -> HFConverter:
    """A converter for a Llama-like architecture (same parameter names; differences only in flags).

    Args:
        attention: HF config -> attention keywords (``qkv_bias``, ``o_bias``, ``qk_norm``).
        ffn_bias: HF config -> whether the MLP has biases.
        hf_flags: ``MyLLMConfig`` -> the HF config flags that produce those keywords (``attention_bias`` ...).
    """

    def to_myllm(hf: PreTrainedConfig) -> dict[str, Any]:
        kwargs = common_config_to_myllm(hf)
        kwargs["attention"] = {"name": "sdpa", **attention(hf)}
        kwargs["ffn"] = {"name": "dense", "bias": ffn_bias(hf)}
        return kwargs

    def to_hf(c: MyLLMConfig) -> dict[str, Any]:
        return {**common_config_to_hf(c), **hf_flags(c)}

    return HFConverter(
        hf_class=hf_class, hf_config_class=hf_config_class, config_to_myllm=to_myllm, config_to_hf=to_hf
    )


register_hf_converter(
    "llama",
    llama_like_converter(
        "LlamaForCausalLM",
        "LlamaConfig",
        attention=lambda hf: {"qkv_bias": hf.attention_bias, "o_bias": hf.attention_bias},
        ffn_bias=lambda hf: hf.mlp_bias,
        hf_flags=lambda c: {
            "attention_bias": c.attention.get("qkv_bias", False),
            "mlp_bias": c.ffn.get("bias", False),
        },
    ),
)
register_hf_converter(
    "mistral",
    llama_like_converter(
        "MistralForCausalLM",
        "MistralConfig",
        attention=lambda hf: {},
        hf_flags=lambda c: {"sliding_window": c.sliding_window if c.has_sliding_layers else None},
    ),
)
register_hf_converter(
    "qwen2",
    llama_like_converter(
        "Qwen2ForCausalLM", "Qwen2Config", attention=lambda hf: {"qkv_bias": True}, hf_flags=sliding_window_to_hf
    ),
)
register_hf_converter(
    "qwen3",
    llama_like_converter(
        "Qwen3ForCausalLM",
        "Qwen3Config",
        attention=lambda hf: {"qkv_bias": hf.attention_bias, "o_bias": hf.attention_bias, "qk_norm": True},
        hf_flags=lambda c: {"attention_bias": c.attention.get("qkv_bias", False), **sliding_window_to_hf(c)},
    ),
)


# ------------------------------------------------------------------------------------------ import / export
def _structure(config: MyLLMConfig) -> list[tuple[str, Any]]:
    """Everything that decides the function of the weights: per layer and slot, the block (attention up to its
    kernel, i.e. its config class) and its resolved keywords; plus the model-level norm and embeddings."""
    items: list[tuple[str, Any]] = [
        ("vocab_size", config.vocab_size),
        ("tie_word_embeddings", config.tie_word_embeddings),
        ("num_hidden_layers", config.num_hidden_layers),
        ("model norm", config.resolve_block("norm")),
        ("layer_types", tuple(config.layer_types)),
        ("sliding_window", config.sliding_window if config.has_sliding_layers else None),
    ]
    for i in range(config.num_hidden_layers):
        for slot in SLOTS:
            name, kwargs = config.resolve_block(slot, i)
            block = registry.get(slot, name).config.__name__ if slot == "attention" else name
            items.append((f"layer {i} {slot}", (block, kwargs)))
    return items


def _hf_class(name: str) -> type[PreTrainedModel]:
    return getattr(transformers, name)


def from_hf(model: PreTrainedModel, *, attn_implementation: str | None = None) -> MyLLMForCausalLM:
    """A :class:`MyLLMForCausalLM` with the weights (and generation config) of HF causal LM ``model``.

    Args:
        model: e.g. a ``LlamaForCausalLM``; its ``config.model_type`` picks the converter.
        attn_implementation: attention block of every layer (``"eager"`` / ``"sdpa"``); default: the HF model's
            own implementation when it is one of those, else ``"sdpa"``.

    Raises:
        ValueError: unsupported ``model_type`` or feature, or weights that do not match the built model.
    """
    converter = get_hf_converter(getattr(model.config, "model_type", None))
    kwargs = converter.config_to_myllm(model.config)
    config = MyLLMConfig(**kwargs, source_model_type=model.config.model_type)
    impl = attn_implementation
    if impl is None and model.config._attn_implementation in config.kernel_variants():
        impl = model.config._attn_implementation
    if impl is not None:
        config._attn_implementation = impl
    state_dict = converter.state_dict_to_myllm(model.state_dict(), model.config)
    ours = MyLLMForCausalLM._from_config(config, dtype=model.dtype)
    _load_exactly(ours, state_dict, what=f"{type(model).__name__} -> MyLLMForCausalLM")
    ours.generation_config = copy.deepcopy(model.generation_config)
    return ours.to(model.device).train(model.training)


def to_hf(model: MyLLMForCausalLM, model_type: str | None = None) -> PreTrainedModel:
    """Export ``model`` to the HF architecture ``model_type`` (default: the one it was imported from).

    Raises:
        ValueError: no target architecture, or a model the target cannot express (the message names the first
            layer and slot that differ).
    """
    model_type = model_type or model.config.source_model_type
    if model_type is None:
        raise ValueError(f"to_hf needs a model_type (this model was not imported); supported: {sorted(HF_CONVERTERS)}")
    converter = get_hf_converter(model_type)
    if model.config.myllm_surgeries:
        ops = sorted({e.get("op", "?") for e in model.config.myllm_surgeries})
        raise ValueError(f"cannot export to {model_type}: the model has recorded surgeries {ops} (added experts)")
    hf_config = getattr(transformers, converter.hf_config_class)(**converter.config_to_hf(model.config))
    expected = MyLLMConfig(**converter.config_to_myllm(hf_config))
    for (where, ours), (_, theirs) in zip(_structure(model.config), _structure(expected), strict=True):
        if ours != theirs:
            raise ValueError(f"cannot export to {model_type}: {where} is {ours}, but {model_type} has {theirs}")
    hf_cls = _hf_class(converter.hf_class)
    hf = hf_cls._from_config(hf_config, attn_implementation=model.config._attn_implementation, dtype=model.dtype)
    state_dict = converter.state_dict_to_hf(model.state_dict(), model.config)
    _load_exactly(hf, state_dict, what=f"MyLLMForCausalLM -> {converter.hf_class}")
    hf.generation_config = copy.deepcopy(model.generation_config)
    return hf.to(model.device).train(model.training)


def _load_exactly(model: torch.nn.Module, state_dict: StateDict, *, what: str) -> None:
    """``load_state_dict`` that must use every tensor and fill every parameter (tied weights count once)."""
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if k not in getattr(model, "all_tied_weights_keys", {})]
    if missing or result.unexpected_keys:
        raise ValueError(f"{what}: missing keys {missing}, unexpected keys {list(result.unexpected_keys)}")


__all__ = [
    "HFConverter",
    "HF_CONVERTERS",
    "common_config_to_hf",
    "common_config_to_myllm",
    "from_hf",
    "get_hf_converter",
    "llama_like_converter",
    "register_hf_converter",
    "rename_keys",
    "to_hf",
]
