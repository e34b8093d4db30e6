"""Reading a trained attention module: the sizes and options every attention conversion starts from.

:func:`read_attention` understands modules with ``nn.Linear`` ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``
and optional per-head ``q_norm``/``k_norm`` (Hugging Face Llama, Mistral, Qwen2, Qwen3, ... attention, and
myllm's own :class:`~myllm.blocks.attention.base.Attention` blocks); anything else raises a ``TypeError``
that says what it expected, before anything is changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionSpec:
    """Sizes and options of a GQA attention module (H query heads, Hk key/value heads, D head dim)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_bias: bool
    k_bias: bool
    v_bias: bool
    o_bias: bool
    qk_norm: bool
    norm_eps: float
    scaling: float
    layer_idx: int
    sliding_window: int | None
    dropout: float
    rope_parameters: dict[str, Any] | None
    max_position_embeddings: int

    def block_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of a myllm GQA attention block (``eager``/``sdpa``/``moba``) with these sizes.

        Raises:
            ValueError: the module has biases on only some of q/k/v, or a sliding window; a GQA block holds
                neither.
        """
        if self.sliding_window is not None:
            raise ValueError(f"sliding-window attention (window {self.sliding_window}) has no myllm block")
        if len({self.q_bias, self.k_bias, self.v_bias}) > 1:
            raise ValueError(
                f"q/k/v biases must be all present or all absent for a GQA block; got q={self.q_bias}, "
                f"k={self.k_bias}, v={self.v_bias}"
            )
        return {
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "qkv_bias": self.q_bias,
            "o_bias": self.o_bias,
            "qk_norm": self.qk_norm,
            "norm_eps": self.norm_eps,
            "dropout": self.dropout,
            "scaling": self.scaling,
            "layer_idx": self.layer_idx,
            "rope_parameters": self.rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
        }


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if isinstance(getattr(norm, name, None), float):
            return getattr(norm, name)
    raise TypeError(f"cannot read the epsilon of q/k norm {type(norm).__name__}")


def _has_norm(module: nn.Module, name: str) -> bool:
    norm = getattr(module, name, None)
    return isinstance(norm, nn.Module) and isinstance(getattr(norm, "weight", None), torch.Tensor)


def _rope(module: nn.Module) -> tuple[dict[str, Any] | None, int]:
    config = getattr(module, "config", None)
    if config is None:  # a myllm block carries its own rotary embedding
        config = getattr(getattr(module, "rotary_emb", None), "config", None)
    params = getattr(config, "rope_parameters", None)
    return (dict(params) if params else None), int(getattr(config, "max_position_embeddings", None) or 4096)


def sliding_window_of(module: nn.Module) -> int | None:
    """The module's own window (Qwen2/Qwen3 set it per layer), else its config's (Mistral reads it there)."""
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    return getattr(getattr(module, "config", None), "sliding_window", None)


def read_attention(module: nn.Module) -> AttentionSpec:
    """The :class:`AttentionSpec` of ``module``.

    Raises:
        TypeError: ``module`` is not a q/k/v/o-projection attention (e.g. an MLA or fused-qkv module).
        ValueError: the projection shapes are inconsistent with one head dim.
    """
    children = dict(module.named_children())
    if not all(isinstance(children.get(p), nn.Linear) for p in _PROJECTIONS):
        raise TypeError(
            f"cannot convert {type(module).__name__}: expected an attention module with nn.Linear q_proj, k_proj, "
            f"v_proj and o_proj (Llama/Mistral/Qwen2/Qwen3-style or a myllm Attention block); it has "
            f"{sorted(children) or 'no submodules'}"
        )
    q, k, v, o = (children[p] for p in _PROJECTIONS)
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(head_dim, int) or q.out_features % head_dim or k.out_features % head_dim:
        raise ValueError(
            f"{type(module).__name__}: head_dim {head_dim!r} does not divide q_proj ({q.out_features}) and "
            f"k_proj ({k.out_features}) outputs"
        )
    num_heads, num_kv = q.out_features // head_dim, k.out_features // head_dim
    if v.out_features != k.out_features or o.in_features != q.out_features or num_heads % num_kv:
        raise ValueError(
            f"{type(module).__name__}: inconsistent projections q {tuple(q.weight.shape)}, k {tuple(k.weight.shape)},"
            f" v {tuple(v.weight.shape)}, o {tuple(o.weight.shape)}"
        )
    qk_norm = _has_norm(module, "q_norm") and _has_norm(module, "k_norm")
    rope_parameters, max_positions = _rope(module)
    return AttentionSpec(
        hidden_size=q.in_features,
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        q_bias=q.bias is not None,
        k_bias=k.bias is not None,
        v_bias=v.bias is not None,
        o_bias=o.bias is not None,
        qk_norm=qk_norm,
        norm_eps=_norm_eps(module.q_norm) if qk_norm else 1e-6,
        scaling=float(getattr(module, "scaling", head_dim**-0.5)),
        layer_idx=int(getattr(module, "layer_idx", 0) or 0),
        sliding_window=sliding_window_of(module),
        dropout=float(getattr(module, "attention_dropout", 0.0) or 0.0),
        rope_parameters=rope_parameters,
        max_position_embeddings=max_positions,
    )
