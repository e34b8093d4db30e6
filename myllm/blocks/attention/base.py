"""Grouped-query attention block (MHA, GQA and MQA) with the Hugging Face v5 module contract.

The block owns ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (and, Qwen3-style, per-head ``q_norm`` /
``k_norm``) under the same names as ``LlamaAttention`` / ``Qwen2Attention`` / ``Qwen3Attention``, so an HF
attention module's state dict loads into it unchanged and the block can replace it inside an HF decoder
layer. It also exposes the attributes transformers' attention functions read (``layer_idx``,
``num_key_value_groups``, ``scaling``, ``head_dim``, ``is_causal``).

Subclasses differ only in :meth:`Attention.attend` (the kernel): ``eager`` and ``sdpa`` here. Blocks registered
with the same pydantic config class (here :class:`AttentionConfig`) are *kernel variants*: same constructor
keywords, same parameters, so a model can switch between them without touching weights (this is what
``MyLLMForCausalLM.set_attn_implementation`` does). Structurally different blocks (MoBA, MLA) register their own
config class. Shapes: ``hidden_states [B, T, hidden_size] -> ([B, T, hidden_size], weights | None)``.
"""

from __future__ import annotations

import abc
import json
from typing import Any

import torch
from pydantic import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, model_validator
from torch import nn
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from myllm.blocks.attention.kernels import eager_attention, sdpa_attention
from myllm.blocks.norm import RMSNorm
from myllm.blocks.registry import BlockConfig, register


class AttentionConfig(BlockConfig):
    """Sizes and options of a GQA attention block (all keyword arguments of :class:`Attention`)."""

    hidden_size: PositiveInt
    num_heads: PositiveInt
    num_kv_heads: PositiveInt | None = None  # None -> MHA
    head_dim: PositiveInt | None = None  # None -> hidden_size // num_heads
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    norm_eps: PositiveFloat = 1e-6
    dropout: NonNegativeFloat = 0.0
    scaling: PositiveFloat | None = None  # None -> head_dim ** -0.5
    layer_idx: NonNegativeInt = 0
    # RoPE, in transformers' ``rope_parameters`` format ({"rope_type": ..., "rope_theta": ..., ...});
    # used when the caller does not pass ``position_embeddings``.
    rope_parameters: dict[str, Any] | None = None
    max_position_embeddings: PositiveInt = 4096

    @model_validator(mode="after")
    def _check_heads(self) -> AttentionConfig:
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({kv})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); pass head_dim"
            )
        return self


def rope_config(
    *, head_dim: int, rope_parameters: dict[str, Any] | None, max_position_embeddings: int
) -> PreTrainedConfig:
    """A minimal transformers config carrying exactly what transformers' RoPE initialisers read."""
    params = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    params.setdefault("rope_type", "default")
    return PreTrainedConfig(
        hidden_size=head_dim,
        num_attention_heads=1,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=params,
    )


def rope_signature(*, head_dim: int, rope_parameters: dict[str, Any] | None, max_position_embeddings: int) -> str:
    """A string equal for two RoPE set-ups iff they compute the same ``(cos, sin)`` (host models compare it to
    share one computation across layers)."""
    params = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    params.setdefault("rope_type", "default")
    return json.dumps([head_dim, max_position_embeddings, params], sort_keys=True, default=str)


def _example() -> dict:
    return {"hidden_size": 32, "num_heads": 4, "num_kv_heads": 2}


class Attention(nn.Module, abc.ABC):
    """GQA self-attention; subclasses choose the kernel by overriding :meth:`attend`.

    Capability attributes read by host models (never the block's name):

    * ``mask_implementation``: the transformers attention implementation whose mask format the kernel prefers
      (``"sdpa"``: 4-D bool or ``None``; ``"eager"``: 4-D float). Every kernel here accepts every form.
    * ``supports_kv_cache``: the block reads and writes a transformers ``Cache``.
    * :meth:`deepnorm_weights`: the value and output projections DeepNorm scales at initialisation.
    * ``rope_signature``: equal to the host's :func:`rope_signature` iff the block can take the host's
      ``position_embeddings``; otherwise the host passes none and the block applies its own RoPE.
    """

    is_causal = True
    supports_kv_cache = True
    mask_implementation = "sdpa"
    takes_sliding_window_mask = True  # whether the block honours transformers' sliding-window masks

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
        scaling: float | None = None,
        layer_idx: int = 0,
        rope_parameters: dict[str, Any] | None = None,
        max_position_embeddings: int = 4096,
    ) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.num_key_value_groups = num_heads // num_kv_heads
        self.scaling = scaling if scaling is not None else self.head_dim**-0.5
        self.attention_dropout = dropout
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=o_bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(hidden_size=self.head_dim, eps=norm_eps)
            self.k_norm = RMSNorm(hidden_size=self.head_dim, eps=norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        rope = {
            "head_dim": self.head_dim,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": max_position_embeddings,
        }
        self.rotary_emb = LlamaRotaryEmbedding(rope_config(**rope))
        self.rope_signature = rope_signature(**rope)

    def deepnorm_weights(self) -> list[torch.Tensor]:
        """The weights DeepNet initialises with gain ``beta``: the value and output projections."""
        return [self.v_proj.weight, self.o_proj.weight]

    @abc.abstractmethod
    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The kernel: ``q [B, H, Tq, D]``, ``k``/``v [B, Hk, Tk, D]`` -> ``([B, Tq, H, D], weights | None)``."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states [B, T, hidden]`` -> ``(out [B, T, hidden], attn_weights [B, H, T, Tk] | None)``.

        ``position_embeddings`` is the ``(cos, sin)`` pair ``[B, T, D]`` the host model computed; when it is
        missing the block computes it from ``position_ids`` (default ``0..T-1`` after the cache) itself.
        """
        cache = cache if cache is not None else past_key_values
        bsz, q_len, _ = hidden_states.shape
        hidden_shape = (bsz, q_len, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape)  # (B, T, H, D)
        key = self.k_proj(hidden_states).view(hidden_shape)  # (B, T, Hk, D)
        if self.qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)  # (B, H, T, D), (B, Hk, T, D)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hk, T, D)

        if position_embeddings is None:
            if position_ids is None:
                past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
                position_ids = torch.arange(past, past + q_len, device=hidden_states.device)[None]
            position_embeddings = self.rotary_emb(hidden_states, position_ids)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)

        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        out, weights = self.attend(
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        out = out.reshape(bsz, q_len, -1).contiguous()  # (B, T, H*D)
        return self.o_proj(out), weights


@register("attention", "eager", config=AttentionConfig, example=_example)
class EagerAttention(Attention):
    """GQA attention with the plain softmax kernel (returns attention weights)."""

    mask_implementation = "eager"

    def attend(self, query, key, value, attention_mask, **kwargs):
        return eager_attention(self, query, key, value, attention_mask, **kwargs)


@register("attention", "sdpa", config=AttentionConfig, example=_example)
class SdpaAttention(Attention):
    """GQA attention through ``torch.nn.functional.scaled_dot_product_attention``."""

    def attend(self, query, key, value, attention_mask, **kwargs):
        return sdpa_attention(self, query, key, value, attention_mask, **kwargs)
