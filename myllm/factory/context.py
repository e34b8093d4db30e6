"""Block sizes from the model itself: what a replacement needs to know about the module it replaces.

:func:`module_facts` reads sizes from the module being replaced (projection shapes, head dims, epsilons,
layer index, sliding window, expert counts) and from the model config for what modules do not carry
(RoPE parameters, activation, number of layers). The facts use myllm's shared keyword vocabulary
(``hidden_size``, ``num_heads``, ``num_kv_heads``, ``head_dim``, ``intermediate_size``, ``n_experts``,
``top_k``, ``eps`` ...); :func:`block_kwargs` passes a block exactly the facts its config declares, and the
caller's keywords override them. Nothing here branches on block names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from myllm import blocks
from myllm.blocks.registry import BlockConfig, BlockSpec

Facts = dict[str, Any]


def _config_get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _eps(module: nn.Module | None) -> float | None:
    if module is None:
        return None
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    sub = getattr(module, name, None)
    return sub if isinstance(sub, nn.Linear) else None


def attention_facts(module: nn.Module, config: Any, layer_idx: int) -> Facts:
    """Sizes of a GQA-style attention module (HF ``*Attention`` or myllm's)."""
    facts: Facts = {"layer_idx": layer_idx}
    q, k, o = _linear(module, "q_proj"), _linear(module, "k_proj"), _linear(module, "o_proj")
    head_dim = getattr(module, "head_dim", None) or _config_get(config, "head_dim")
    if q is not None:
        facts["hidden_size"] = q.in_features
        if head_dim is None:
            head_dim = q.in_features // _config_get(config, "num_attention_heads", default=1)
        facts["num_heads"] = q.out_features // head_dim
        facts["qkv_bias"] = q.bias is not None
    if k is not None and head_dim:
        facts["num_kv_heads"] = k.out_features // head_dim
    if o is not None:
        facts["o_bias"] = o.bias is not None
    if head_dim:
        facts["head_dim"] = head_dim
    q_norm = getattr(module, "q_norm", None)
    facts["qk_norm"] = isinstance(getattr(q_norm, "weight", None), nn.Parameter)
    eps = _eps(q_norm) or _config_get(config, "rms_norm_eps", "layer_norm_eps")
    if eps is not None:
        facts["norm_eps"] = eps
    for ours, theirs in (("dropout", "attention_dropout"), ("sliding_window", "sliding_window")):
        if hasattr(module, theirs):
            facts[ours] = getattr(module, theirs)
    scaling = getattr(module, "scaling", None)
    if scaling is not None and head_dim and abs(scaling - head_dim**-0.5) > 1e-12:  # e.g. Gemma's query scalar
        facts["scaling"] = scaling
    rope = _config_get(config, "rope_parameters")
    if rope is not None:
        facts["rope_parameters"] = dict(rope)
    max_pos = _config_get(config, "max_position_embeddings")
    if max_pos is not None:
        facts["max_position_embeddings"] = max_pos
    return facts


def ffn_facts(module: nn.Module, config: Any, layer_idx: int) -> Facts:
    """Sizes of a dense MLP, or of an MoE block in the HF v5 fused-experts layout."""
    facts: Facts = {"layer_idx": layer_idx}
    act = getattr(module, "act_name", None) or _config_get(config, "hidden_act", "hidden_activation")
    if act is not None:
        facts["act"] = act
    up, down = _linear(module, "up_proj"), _linear(module, "down_proj")
    if up is not None and down is not None:
        facts.update(
            hidden_size=down.out_features,
            intermediate_size=up.out_features,
            gated=_linear(module, "gate_proj") is not None,
            bias=up.bias is not None,
        )
    experts = getattr(module, "experts", None)
    gate_up = getattr(experts, "gate_up_proj", None)
    if isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3:
        n_experts, two_i, hidden = gate_up.shape
        facts.update(hidden_size=hidden, intermediate_size=two_i // 2, n_experts=n_experts)
    router = getattr(module, "gate", None) or getattr(module, "router", None)
    for ours, theirs in (("top_k", "top_k"), ("norm_topk_prob", "norm_topk_prob")):
        value = getattr(router, theirs, getattr(module, theirs, None))
        if value is not None:
            facts[ours] = value
    facts.update(_moe_facts(module, config))
    return facts


class _BaseTypeView:
    """A config seen with its base ``model_type`` (``myllm_qwen2_moe`` -> ``qwen2_moe``)."""

    def __init__(self, config: Any) -> None:
        self._config = config
        self.model_type = getattr(config, "myllm_base_model_type", None) or getattr(config, "model_type", None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def _moe_facts(module: nn.Module, config: Any) -> Facts:
    """Everything about an MoE block: a myllm block's own config, or an HF block's via its model config."""
    own = getattr(module, "block_config", None)
    if isinstance(own, BlockConfig):
        return dict(own)
    experts = getattr(module, "experts", None)
    if not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor) or "moe" not in blocks.available("ffn"):
        return {}
    from myllm.blocks.ffn.moe import hf

    try:
        facts = hf.moe_kwargs_from_hf(_BaseTypeView(config))
    except (KeyError, ValueError):
        return {}
    # the block itself is the truth for sizes (e.g. after add_experts)
    facts["n_experts"] = experts.gate_up_proj.shape[0]
    return facts


def norm_facts(module: nn.Module, config: Any, layer_idx: int) -> Facts:
    """Size and epsilon of a norm module, and the depth DeepNorm's residual scale needs."""
    facts: Facts = {"layer_idx": layer_idx}
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        facts["hidden_size"] = weight.shape[0]
    eps = _eps(module) or _config_get(config, "rms_norm_eps", "layer_norm_eps")
    if eps is not None:
        facts["eps"] = eps
    facts["num_layers"] = _config_get(config, "num_hidden_layers")
    return facts


FACTS: dict[str, Callable[[nn.Module, Any, int], Facts]] = {
    "attention": attention_facts,
    "ffn": ffn_facts,
    "norm": norm_facts,
}


def module_facts(kind: str, module: nn.Module, config: Any, layer_idx: int) -> Facts:
    """Everything known about ``module`` (of slot ``kind``) in myllm's keyword vocabulary."""
    return {k: v for k, v in FACTS[kind](module, config, layer_idx).items() if v is not None}


def block_kwargs(spec: BlockSpec, facts: Facts, overrides: dict[str, Any]) -> dict[str, Any]:
    """The facts ``spec``'s config declares, overridden by the caller's keywords (validated later)."""
    fields = spec.config.model_fields
    kwargs = {k: v for k, v in facts.items() if k in fields}
    kwargs.update(overrides)
    return kwargs


def module_dtype_device(module: nn.Module, fallback: nn.Module | None = None) -> tuple[torch.dtype, torch.device]:
    """The floating dtype and device of ``module``'s parameters (or of ``fallback``'s)."""
    for m in (module, fallback):
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_floating_point():
                return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")
