"""Pure mappings between HF MoE blocks and the ``moe`` block: config -> kwargs, state dicts both ways.

Supported HF blocks (``model_type``): ``qwen2_moe`` (``Qwen2MoeSparseMoeBlock``: softmax top-k without
renormalisation by default, one shared expert behind a sigmoid gate), ``qwen3_moe`` (no shared expert),
``mixtral`` (``MixtralSparseMoeBlock``: softmax top-k renormalised) and ``deepseek_v3`` (``DeepseekV3MoE``:
sigmoid scores, ``e_score_correction_bias``, group-limited routing, routed scaling, shared experts).

State dicts are the *block's* (keys relative to the MoE module, e.g. ``gate.weight``,
``experts.gate_up_proj``); tensors are passed through unchanged (no copies). Only prefixes differ::

    kwargs = moe_kwargs_from_hf(hf_config)
    block = MoE(**kwargs)
    block.load_state_dict(moe_state_dict_from_hf("qwen2_moe", hf_block.state_dict()))
    hf_block.load_state_dict(moe_state_dict_to_hf("qwen2_moe", block.state_dict()))

The way back for configs, :func:`hf_config_from_moe_kwargs`, raises when the block uses an option the HF
architecture cannot express (temperature, groups on Qwen, ...), naming it. Training-only balancing terms
HF has no field for (``seq_aux``, ``z_loss``, the loss-free update rate) do not change the block's
function and are left out; ``switch`` maps to ``router_aux_loss_coef`` + ``output_router_logits``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from myllm.blocks.ffn.moe.config import MoEConfig


@dataclass(frozen=True)
class HFMoEAdapter:
    """How one HF architecture's MoE block maps onto ``moe``.

    Attributes:
        kwargs_from_config: HF config -> ``MoE`` keyword arguments.
        config_fields: ``MoE`` keyword arguments -> the HF config fields that describe the block.
        fixed: ``MoE`` keyword values the HF block hard-codes (checked on the way back).
        renames: ``(hf_prefix, our_prefix)`` pairs of state-dict key prefixes that differ.
    """

    kwargs_from_config: Callable[[Any], dict[str, Any]]
    config_fields: Callable[[MoEConfig], dict[str, Any]]
    fixed: dict[str, Any]
    renames: tuple[tuple[str, str], ...] = ()


def _balance(config: Any) -> dict[str, float]:
    # HF adds the Switch loss to the LM loss only when the model outputs router logits.
    coef = getattr(config, "router_aux_loss_coef", 0.0)
    return {"switch": coef} if getattr(config, "output_router_logits", False) and coef else {}


def _common(config: Any, n_experts: int, intermediate: int) -> dict[str, Any]:
    return {
        "hidden_size": config.hidden_size,
        "n_experts": n_experts,
        "top_k": config.num_experts_per_tok,
        "intermediate_size": intermediate,
        "act": config.hidden_act,
    }


def _qwen2_kwargs(config: Any) -> dict[str, Any]:
    return {
        **_common(config, config.num_experts, config.moe_intermediate_size),
        "norm_topk_prob": config.norm_topk_prob,
        "n_shared_experts": 1,
        "shared_intermediate_size": config.shared_expert_intermediate_size,
        "shared_gate": True,
        "balance": _balance(config),
    }


def _qwen2_fields(cfg: MoEConfig) -> dict[str, Any]:
    return {
        "hidden_size": cfg.hidden_size,
        "num_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "moe_intermediate_size": cfg.intermediate_size,
        "shared_expert_intermediate_size": cfg.shared_intermediate_size or cfg.intermediate_size,
        "norm_topk_prob": cfg.norm_topk_prob,
        "hidden_act": cfg.act,
    }


def _qwen3_kwargs(config: Any) -> dict[str, Any]:
    return {
        **_common(config, config.num_experts, config.moe_intermediate_size),
        "norm_topk_prob": config.norm_topk_prob,
        "balance": _balance(config),
    }


def _qwen3_fields(cfg: MoEConfig) -> dict[str, Any]:
    fields = _qwen2_fields(cfg)
    del fields["shared_expert_intermediate_size"]
    return fields


def _mixtral_kwargs(config: Any) -> dict[str, Any]:
    return {
        **_common(config, config.num_local_experts, config.intermediate_size),
        "norm_topk_prob": True,
        "jitter": config.router_jitter_noise,
        "balance": _balance(config),
    }


def _mixtral_fields(cfg: MoEConfig) -> dict[str, Any]:
    return {
        "hidden_size": cfg.hidden_size,
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "intermediate_size": cfg.intermediate_size,
        "router_jitter_noise": cfg.jitter,
        "hidden_act": cfg.act,
    }


def _deepseek_kwargs(config: Any) -> dict[str, Any]:
    return {
        **_common(config, config.n_routed_experts, config.moe_intermediate_size),
        "score_func": "sigmoid",
        "norm_topk_prob": bool(config.norm_topk_prob),
        "routed_scaling_factor": config.routed_scaling_factor,
        "n_group": config.n_group,
        "topk_group": config.topk_group,
        "score_correction_bias": True,
        "n_shared_experts": config.n_shared_experts,
        "shared_intermediate_size": config.moe_intermediate_size,
    }


def _deepseek_fields(cfg: MoEConfig) -> dict[str, Any]:
    return {
        "hidden_size": cfg.hidden_size,
        "n_routed_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "moe_intermediate_size": cfg.intermediate_size,
        "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "n_shared_experts": cfg.n_shared_experts,
        "hidden_act": cfg.act,
    }


_SOFTMAX_FIXED = {
    "score_func": "softmax",
    "temperature": 1.0,
    "routed_scaling_factor": 1.0,
    "n_group": 1,
    "topk_group": 1,
    "score_correction_bias": False,
}

HF_MOE_ADAPTERS: dict[str, HFMoEAdapter] = {
    "qwen2_moe": HFMoEAdapter(
        _qwen2_kwargs,
        _qwen2_fields,
        {**_SOFTMAX_FIXED, "n_shared_experts": 1, "shared_gate": True, "jitter": 0.0},
        renames=(("shared_expert.", "shared_experts."),),
    ),
    "qwen3_moe": HFMoEAdapter(_qwen3_kwargs, _qwen3_fields, {**_SOFTMAX_FIXED, "n_shared_experts": 0, "jitter": 0.0}),
    "mixtral": HFMoEAdapter(
        _mixtral_kwargs, _mixtral_fields, {**_SOFTMAX_FIXED, "norm_topk_prob": True, "n_shared_experts": 0}
    ),
    "deepseek_v3": HFMoEAdapter(
        _deepseek_kwargs,
        _deepseek_fields,
        {
            "score_func": "sigmoid",
            "temperature": 1.0,
            "jitter": 0.0,
            "shared_gate": False,
            "score_correction_bias": True,
        },
    ),
}


def _adapter(model_type: str) -> HFMoEAdapter:
    if model_type not in HF_MOE_ADAPTERS:
        raise KeyError(
            f"no MoE mapping for model_type {model_type!r}; supported: {', '.join(sorted(HF_MOE_ADAPTERS))}"
        )
    return HF_MOE_ADAPTERS[model_type]


def moe_kwargs_from_hf(config: Any) -> dict[str, Any]:
    """``MoE`` keyword arguments equivalent to the MoE block of an HF config (validated)."""
    kwargs = _adapter(config.model_type).kwargs_from_config(config)
    MoEConfig(**kwargs)
    return kwargs


def hf_config_from_moe_kwargs(model_type: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """HF config fields describing a ``MoE`` block built from ``kwargs``.

    Raises:
        ValueError: the block uses an option the HF architecture does not have (names the options).
    """
    adapter = _adapter(model_type)
    cfg = MoEConfig(**kwargs)
    values = {**cfg.model_dump(), "score_correction_bias": cfg.has_score_bias}  # loss-free needs the buffer too
    bad = [f"{k}={values[k]!r} (HF has {v!r})" for k, v in adapter.fixed.items() if values[k] != v]
    if bad:
        raise ValueError(f"{model_type} cannot express this MoE block: {'; '.join(bad)}")
    fields = adapter.config_fields(cfg)
    if "switch" in cfg.balance and model_type != "deepseek_v3":
        fields.update(router_aux_loss_coef=cfg.balance["switch"], output_router_logits=True)
    return fields


def _rename(state_dict: Mapping[str, torch.Tensor], pairs: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        for old, new in pairs:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def moe_state_dict_from_hf(model_type: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF MoE block's state dict (keys relative to the block) as the ``moe`` block's."""
    return _rename(state_dict, _adapter(model_type).renames)


def moe_state_dict_to_hf(model_type: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``moe`` block's state dict as the HF MoE block's (the inverse of :func:`moe_state_dict_from_hf`)."""
    return _rename(state_dict, tuple((new, old) for old, new in _adapter(model_type).renames))
