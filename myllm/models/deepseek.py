"""DeepSeek-V3 import and export (``model_type`` ``deepseek_v3``): multi-head latent attention as the ``mla`` block.

:func:`deepseek_attention_spec` maps a DeepSeek-V2/V3 config to the ``MyLLMConfig`` attention spec whose
``mla`` block has exactly the parameters of transformers' ``DeepseekV3Attention`` (so the state dict is
the identity), and :func:`deepseek_attention_config` maps it back. The converter registered here imports
models whose layers all have a dense FFN (``first_k_dense_replace >= num_hidden_layers``); layers with
DeepSeek's MoE FFN raise a clear error until the MoE mapping extends this converter
(``register_hf_converter("deepseek_v3", ..., override=True)``, reusing the two attention functions). Imported
models decode from the ``latent`` cache block (the compressed latent and the RoPE key per token).

Note: the latent RMSNorm ``kv_a_layernorm`` (and ``q_a_layernorm``) of transformers' DeepSeek-V3 use
epsilon 1e-6 whatever ``rms_norm_eps`` says; the spec pins ``norm_eps=1e-6`` for that reason.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from myllm.models.configuration import MyLLMConfig
from myllm.models.convert import HFConverter, common_config_to_hf, common_config_to_myllm, register_hf_converter

_LATENT_NORM_EPS = 1e-6  # DeepseekV3RMSNorm's default, used for q_a_layernorm / kv_a_layernorm


def deepseek_attention_spec(hf: PreTrainedConfig) -> dict[str, Any]:
    """The ``MyLLMConfig`` attention spec (block ``mla``) of a DeepSeek-V2/V3 config."""
    return {
        "name": "mla",
        "kv_lora_rank": hf.kv_lora_rank,
        "q_lora_rank": hf.q_lora_rank,
        "qk_nope_head_dim": hf.qk_nope_head_dim,
        "qk_rope_head_dim": hf.qk_rope_head_dim,
        "v_head_dim": hf.v_head_dim,
        "num_kv_heads": hf.num_attention_heads,  # kv_b_proj has a key/value head per query head
        "rope_interleave": bool(getattr(hf, "rope_interleave", True)),
        "attention_bias": bool(hf.attention_bias),
        "norm_eps": _LATENT_NORM_EPS,
    }


def deepseek_attention_config(config: MyLLMConfig) -> dict[str, Any]:
    """The ``DeepseekV3Config`` keywords of a MyLLM model's (``mla``) attention spec."""
    spec = config.attention
    return {
        "kv_lora_rank": spec["kv_lora_rank"],
        "q_lora_rank": spec.get("q_lora_rank"),
        "qk_nope_head_dim": spec["qk_nope_head_dim"],
        "qk_rope_head_dim": spec["qk_rope_head_dim"],
        "v_head_dim": spec["v_head_dim"],
        "rope_interleave": spec.get("rope_interleave", True),
        "attention_bias": spec.get("attention_bias", False),
    }


def _to_myllm(hf: PreTrainedConfig) -> dict[str, Any]:
    dense = hf.first_k_dense_replace if hf.first_k_dense_replace is not None else hf.num_hidden_layers
    if dense < hf.num_hidden_layers:
        raise ValueError(
            f"DeepSeek-V3 layers {dense}..{hf.num_hidden_layers - 1} use the MoE FFN (first_k_dense_replace={dense}); "
            "this converter imports dense layers only (the MoE FFN mapping extends it)"
        )
    kwargs = common_config_to_myllm(hf)  # head_dim is qk_rope_head_dim: the model's RoPE table is MLA's
    kwargs["attention"] = deepseek_attention_spec(hf)
    kwargs["kv_cache"] = {"name": "latent"}
    return kwargs


def _to_hf(c: MyLLMConfig) -> dict[str, Any]:
    kwargs = {k: v for k, v in common_config_to_hf(c).items() if k != "head_dim"}  # DeepSeek derives it
    kwargs.update(deepseek_attention_config(c))
    kwargs.update(num_key_value_heads=c.num_attention_heads, first_k_dense_replace=c.num_hidden_layers)
    return kwargs


register_hf_converter(
    "deepseek_v3",
    HFConverter(
        hf_class="DeepseekV3ForCausalLM",
        hf_config_class="DeepseekV3Config",
        config_to_myllm=_to_myllm,
        config_to_hf=_to_hf,
    ),
)

__all__ = ["deepseek_attention_config", "deepseek_attention_spec"]
