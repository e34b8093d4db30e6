"""HF MoE causal LMs <-> MyLLM: ``qwen2_moe``, ``qwen3_moe`` and ``mixtral`` entries of ``HF_CONVERTERS``.

Every MoE layer becomes the registry's ``moe`` FFN block (kwargs from
:func:`myllm.blocks.ffn.moe.hf.moe_kwargs_from_hf`); Qwen's dense layers (``mlp_only_layers``,
``decoder_sparse_step``) become ``layer_overrides`` with a ``dense`` FFN, as DeepSeek's first dense layers
would. Weights keep their names except Qwen2-MoE's ``mlp.shared_expert.*`` -> ``mlp.shared_experts.*``.

Balancing: HF adds ``router_aux_loss_coef * load_balancing_loss_func(all layers)`` when
``output_router_logits`` is on; MyLLM sums each MoE block's ``aux_loss``. The importer gives each of the L
MoE layers the Switch coefficient ``router_aux_loss_coef / L`` (same scale; identical for one MoE layer,
while for several HF multiplies layer-averaged loads and probabilities instead of averaging per-layer
products). Mixtral's ``router_jitter_noise`` becomes the router's input jitter (HF also jitters the experts'
input; training only).

DeepSeek-V3 (``deepseek_v3``): the attention (``mla``) and latent cache come from
:mod:`myllm.models.deepseek`, whose dense-only converter this module replaces (``override=True``) with one
that also maps the MoE layers (sigmoid router with ``e_score_correction_bias``, groups, routed scaling,
shared experts); layers below ``first_k_dense_replace`` stay dense. HF computes no aux loss for DeepSeek-V3,
so the import configures none; add ``balance={"loss_free": ...}`` (or others) to train with balancing.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

from transformers import PreTrainedConfig

from myllm.blocks.ffn.moe.hf import hf_config_from_moe_kwargs, moe_kwargs_from_hf
from myllm.models.configuration import MyLLMConfig
from myllm.models.convert import (
    HFConverter,
    common_config_to_hf,
    common_config_to_myllm,
    register_hf_converter,
    rename_keys,
    sliding_window_to_hf,
)
from myllm.models.deepseek import deepseek_attention_config, deepseek_attention_spec

_DERIVED = ("hidden_size", "act")  # the model supplies these to every FFN block


def _qwen_moe_layers(hf: PreTrainedConfig) -> list[bool]:
    """Qwen2/3-MoE's rule for which layers hold a sparse block."""
    return [
        i not in hf.mlp_only_layers and hf.num_experts > 0 and (i + 1) % hf.decoder_sparse_step == 0
        for i in range(hf.num_hidden_layers)
    ]


def _all_moe_layers(hf: PreTrainedConfig) -> list[bool]:
    return [True] * hf.num_hidden_layers


def _without_unused_sliding_window(hf: PreTrainedConfig) -> PreTrainedConfig:
    """Qwen-MoE configs keep ``sliding_window`` (0 or 4096) even with ``use_sliding_window=False``."""
    if getattr(hf, "use_sliding_window", False) or not hasattr(hf, "use_sliding_window"):
        return hf
    view = copy.copy(hf)
    view.sliding_window = None
    return view


def _scaled_switch(kwargs: dict[str, Any], factor: float) -> dict[str, Any]:
    balance = dict(kwargs.get("balance") or {})
    if "switch" in balance:
        balance["switch"] *= factor
    return {**kwargs, "balance": balance}


def moe_converter(
    model_type: str,
    hf_class: str,
    hf_config_class: str,
    *,
    moe_layers: Callable[[PreTrainedConfig], list[bool]],
    attention: Callable[[PreTrainedConfig], dict[str, Any]],
    hf_flags: Callable[[MyLLMConfig, list[int]], dict[str, Any]],
    renames: list[tuple[str, str]] | None = None,
) -> HFConverter:
    """An :class:`HFConverter` for a Llama-like MoE architecture.

    Args:
        moe_layers: HF config -> per layer, whether it is sparse.
        attention: HF config -> the ``MyLLMConfig`` keywords of the attention (its ``attention`` spec, and for
            DeepSeek the ``kv_cache`` spec).
        hf_flags: ``(MyLLMConfig, dense layer indices)`` -> architecture-specific HF config keywords (attention
            flags, where the dense layers are); raises ``ValueError`` for layouts the target cannot express.
        renames: ``(hf_text, myllm_text)`` literal substrings of parameter names; reversed on export.
    """
    renames = renames or []

    def to_myllm(hf: PreTrainedConfig) -> dict[str, Any]:
        kwargs = common_config_to_myllm(_without_unused_sliding_window(hf))
        sparse = moe_layers(hf)
        moe = {k: v for k, v in moe_kwargs_from_hf(hf).items() if k not in _DERIVED}
        kwargs.update(attention(hf))
        kwargs["ffn"] = {"name": "moe", **_scaled_switch(moe, 1.0 / max(1, sum(sparse)))}
        kwargs["layer_overrides"] = {str(i): {"ffn": {"name": "dense"}} for i, s in enumerate(sparse) if not s}
        kwargs["output_router_logits"] = bool(getattr(hf, "output_router_logits", False))
        return kwargs

    def to_hf(c: MyLLMConfig) -> dict[str, Any]:
        resolved = [c.resolve_block("ffn", i) for i in range(c.num_hidden_layers)]
        sparse = [i for i, (name, _) in enumerate(resolved) if name == "moe"]
        dense = [i for i, (name, _) in enumerate(resolved) if name != "moe"]
        fields = {}  # a model without MoE layers keeps the target's default MoE fields (unused)
        if sparse:
            moe_kwargs = _scaled_switch(resolved[sparse[0]][1], float(len(sparse)))
            fields = hf_config_from_moe_kwargs(model_type, moe_kwargs)
        return {**common_config_to_hf(c), **fields, **hf_flags(c, dense)}

    return HFConverter(
        hf_class=hf_class,
        hf_config_class=hf_config_class,
        config_to_myllm=to_myllm,
        config_to_hf=to_hf,
        state_dict_to_myllm=rename_keys([(re.escape(hf_text), ours) for hf_text, ours in renames]),
        state_dict_to_hf=rename_keys([(re.escape(ours), hf_text) for hf_text, ours in renames]),
    )


def _sdpa(**kwargs: Any) -> dict[str, Any]:
    return {"attention": {"name": "sdpa", **kwargs}}


def _qwen_flags(c: MyLLMConfig, dense: list[int], *, per_layer_windows: bool) -> dict[str, Any]:
    return {
        "mlp_only_layers": dense,
        "decoder_sparse_step": 1,
        **sliding_window_to_hf(c, per_layer=per_layer_windows),  # Qwen2-MoE has layer_types, Qwen3-MoE not
        "output_router_logits": c.output_router_logits,
    }


def _mixtral_flags(c: MyLLMConfig, dense: list[int]) -> dict[str, Any]:
    if dense:
        raise ValueError(f"cannot export to mixtral: layers {dense} have a dense FFN, Mixtral has only MoE layers")
    window = c.sliding_window if c.has_sliding_layers else None  # every layer or none (checked on export)
    return {"sliding_window": window, "output_router_logits": c.output_router_logits}


def _deepseek_moe_layers(hf: PreTrainedConfig) -> list[bool]:
    return [i >= hf.first_k_dense_replace for i in range(hf.num_hidden_layers)]


def _deepseek_attention(hf: PreTrainedConfig) -> dict[str, Any]:
    return {"attention": deepseek_attention_spec(hf), "kv_cache": {"name": "latent"}}


def _deepseek_flags(c: MyLLMConfig, dense: list[int]) -> dict[str, Any]:
    if dense != list(range(len(dense))):
        raise ValueError(
            f"cannot export to deepseek_v3: its dense layers are the first ones (first_k_dense_replace), got {dense}"
        )
    return {
        **deepseek_attention_config(c),
        "head_dim": c.attention["qk_rope_head_dim"],  # what DeepseekV3Config derives (RoPE dims)
        "num_key_value_heads": c.num_attention_heads,
        "first_k_dense_replace": len(dense),
    }


register_hf_converter(
    "qwen2_moe",
    moe_converter(
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        moe_layers=_qwen_moe_layers,
        attention=lambda hf: _sdpa(qkv_bias=hf.qkv_bias),
        hf_flags=lambda c, dense: {
            **_qwen_flags(c, dense, per_layer_windows=True),
            "qkv_bias": c.attention.get("qkv_bias", False),
        },
        renames=[(".mlp.shared_expert.", ".mlp.shared_experts.")],
    ),
)
register_hf_converter(
    "qwen3_moe",
    moe_converter(
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        moe_layers=_qwen_moe_layers,
        attention=lambda hf: _sdpa(qkv_bias=hf.attention_bias, o_bias=hf.attention_bias, qk_norm=True),
        hf_flags=lambda c, dense: {
            **_qwen_flags(c, dense, per_layer_windows=False),
            "attention_bias": c.attention.get("qkv_bias", False),
        },
    ),
)
register_hf_converter(
    "mixtral",
    moe_converter(
        "mixtral",
        "MixtralForCausalLM",
        "MixtralConfig",
        moe_layers=_all_moe_layers,
        attention=lambda hf: _sdpa(),
        hf_flags=_mixtral_flags,
    ),
)
register_hf_converter(
    "deepseek_v3",
    moe_converter(
        "deepseek_v3",
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        moe_layers=_deepseek_moe_layers,
        attention=_deepseek_attention,
        hf_flags=_deepseek_flags,
    ),
    override=True,  # replaces myllm.models.deepseek's dense-only converter (same attention mapping)
)
