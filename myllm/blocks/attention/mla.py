"""Multi-head latent attention (``attention`` block ``mla``; DeepSeek-V2 arXiv 2405.04434, DeepSeek-V3).

Legend: B batch, T queries, Tk keys (cache included), H query heads, Hkv key/value heads of ``kv_b_proj``
(DeepSeek: H), R heads of the decoupled RoPE key (DeepSeek: 1), r ``kv_lora_rank``, dn ``qk_nope_head_dim``,
dr ``qk_rope_head_dim``, dv ``v_head_dim``, dq = dn + dr.

Keys and values come from a low-rank latent ``c = kv_a_layernorm(W_dkv h)`` (``[B, T, r]``) through
``kv_b_proj`` (per kv head ``[k_nope (dn) | v (dv)]``); position enters only through a decoupled RoPE key
``k_rope`` (``[B, T, R, dr]``) that is shared by the heads of its group. Queries are ``q_proj(h)`` or, with
``q_lora_rank``, ``q_b_proj(q_a_layernorm(q_a_proj(h)))``, split per head into ``[q_nope (dn) | q_rope (dr)]``.

Module and parameter names are those of transformers' ``DeepseekV3Attention`` (``q_proj`` or
``q_a_proj``/``q_a_layernorm``/``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``,
``o_proj``), so a DeepSeek-V2/V3 attention state dict loads unchanged (with ``num_kv_heads = num_heads``,
``num_rope_heads = 1`` and the model's ``rope_interleave``).

**Cache** (any transformers ``Cache``, e.g. the ``latent`` cache block): per layer only the latent ``[B, 1,
Tk, r]`` (keys slot, after ``kv_a_layernorm``) and the rotated RoPE key ``[B, 1, Tk, R * dr (+ Hkv)]`` (values
slot), the same layout transformers' DeepSeek-V3 writes. **Decoding** (a cache holding past tokens, or
``absorb="always"``) uses weight absorption: ``q_nope`` is multiplied into the latent space by ``kv_b_proj``'s
key half, attention runs over the cached latent, and the value half is applied to the result; past keys and
values are never re-expanded. Without past tokens (prefill, training) keys/values are expanded once and go
through SDPA. Both paths compute the same function (tests: <= 1e-5).

**Extensions for converted models** (stock DeepSeek cannot hold them; such blocks do not export to
``DeepseekV3ForCausalLM``):

* ``num_kv_heads < num_heads``: ``kv_b_proj`` produces GQA key/value heads (no duplicated rows).
* ``num_rope_heads = num_kv_heads``: one RoPE key per kv head (the original keys' rotary part).
* ``rope_pairs`` / ``rope_table_dim``: the rotary frequency of every RoPE pair, as an index into the host
  model's ``(cos, sin)`` table of head dim ``rope_table_dim`` (MHA2MLA-style partial RoPE keeps the most
  important frequency pairs of the original heads).
* ``latent_norm=False``: no ``kv_a_layernorm`` (it is non-linear, so an exact conversion cannot have it).
* ``q_bias``: a bias on ``q_proj``/``q_b_proj`` (Qwen2); ``attention_bias`` keeps DeepSeek's meaning (biases
  on ``q_a_proj``, ``kv_a_proj_with_mqa``, ``o_proj``).
* ``qk_norm`` (Qwen3): per-head RMSNorm of the query ``[q_nope | q_rope]`` and of each kv head's key
  ``[k_nope | k_rope]`` before RoPE (weights ``q_norm.weight``, ``k_norm.weight`` of size dq). The key norm's
  per-token scale ``1 / rms`` of each kv head is computed when a token is written and cached as ``Hkv`` extra
  channels of the values slot, so absorption still works (the scale multiplies the latent logits).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, model_validator
from torch import nn
from transformers.cache_utils import Cache
from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from myllm.blocks.attention.base import Attention, rope_config, rope_signature
from myllm.blocks.attention.kernels import as_bool_mask, sdpa_attention
from myllm.blocks.norm import RMSNorm
from myllm.blocks.registry import BlockConfig, register


class MLAConfig(BlockConfig):
    """Sizes and options of an MLA block (all keyword arguments of :class:`MLAttention`)."""

    hidden_size: PositiveInt
    num_heads: PositiveInt
    kv_lora_rank: PositiveInt
    qk_nope_head_dim: NonNegativeInt
    qk_rope_head_dim: NonNegativeInt
    v_head_dim: PositiveInt
    q_lora_rank: PositiveInt | None = None
    num_kv_heads: PositiveInt | None = None  # None -> num_heads (DeepSeek)
    num_rope_heads: PositiveInt = 1
    rope_interleave: bool = True  # DeepSeek-V3's default: rotary pairs are adjacent dims
    rope_pairs: list[list[NonNegativeInt]] | None = None  # [R][dr / 2] frequency index of each pair
    rope_table_dim: PositiveInt | None = None  # head dim of the (cos, sin) table; None -> qk_rope_head_dim
    latent_norm: bool = True
    attention_bias: bool = False
    q_bias: bool = False
    qk_norm: bool = False
    norm_eps: PositiveFloat = 1e-6
    dropout: NonNegativeFloat = 0.0
    scaling: PositiveFloat | None = None  # None -> qk_head_dim ** -0.5 (times YaRN's mscale^2 if configured)
    layer_idx: NonNegativeInt = 0
    rope_parameters: dict[str, Any] | None = None
    max_position_embeddings: PositiveInt = 4096
    absorb: Literal["auto", "always", "never"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> MLAConfig:
        kv = self.num_kv_heads or self.num_heads
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (rotary pairs), got {self.qk_rope_head_dim}")
        if self.qk_nope_head_dim + self.qk_rope_head_dim == 0:
            raise ValueError("qk_nope_head_dim + qk_rope_head_dim must be positive")
        if self.num_heads % kv:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({kv})")
        if self.num_rope_heads not in (1, kv):
            raise ValueError(f"num_rope_heads must be 1 or num_kv_heads ({kv}), got {self.num_rope_heads}")
        if self.qk_norm and self.num_rope_heads != kv:
            raise ValueError(
                "qk_norm normalises each kv head's [k_nope | k_rope]: it needs num_rope_heads == num_kv_heads"
            )
        table = self.rope_table_dim or self.qk_rope_head_dim
        if self.rope_pairs is None:
            if table != self.qk_rope_head_dim:
                raise ValueError(
                    "rope_table_dim differs from qk_rope_head_dim: give rope_pairs to pick the frequencies"
                )
        else:
            n = self.qk_rope_head_dim // 2
            if len(self.rope_pairs) != self.num_rope_heads or any(len(p) != n for p in self.rope_pairs):
                raise ValueError(f"rope_pairs must be {self.num_rope_heads} lists of {n} frequency indices")
            if any(i >= table // 2 for p in self.rope_pairs for i in p):
                raise ValueError(f"rope_pairs index beyond the {table // 2} frequencies of rope_table_dim {table}")
        return self


def _example() -> dict:
    return {
        "hidden_size": 32,
        "num_heads": 4,
        "kv_lora_rank": 8,
        "q_lora_rank": 12,
        "qk_nope_head_dim": 6,
        "qk_rope_head_dim": 4,
        "v_head_dim": 6,
    }


@register("attention", "mla", config=MLAConfig, example=_example)
class MLAttention(Attention):
    """Multi-head latent attention with DeepSeek-V3 parameter names and an absorbed-weight decoding path."""

    # Capability read by the factory: converting trained attention decides this block's sizes (latent layout,
    # RoPE pairs) from the weights, so its keywords are completed by the weight mover before validation.
    kwargs_from_weights = True
    takes_sliding_window_mask = False  # the latent cache and absorbed decoding are not built for window masks

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        q_lora_rank: int | None = None,
        num_kv_heads: int | None = None,
        num_rope_heads: int = 1,
        rope_interleave: bool = True,
        rope_pairs: list[list[int]] | None = None,
        rope_table_dim: int | None = None,
        latent_norm: bool = True,
        attention_bias: bool = False,
        q_bias: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
        scaling: float | None = None,
        layer_idx: int = 0,
        rope_parameters: dict[str, Any] | None = None,
        max_position_embeddings: int = 4096,
        absorb: str = "auto",
    ) -> None:
        config = MLAConfig(**{k: v for k, v in locals().items() if k in MLAConfig.model_fields})  # validate
        nn.Module.__init__(self)  # the GQA base's q/k/v projections do not exist here; only its contract is kept
        self.block_kwargs = config.model_dump()  # what rebuilds this block (e.g. for a saved recipe)
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.num_key_value_groups = num_heads // self.num_kv_heads
        self.num_rope_heads = num_rope_heads
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = self.head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.rope_interleave, self.qk_norm, self.absorb = rope_interleave, qk_norm, absorb
        self.rope_table_dim = rope_table_dim or qk_rope_head_dim
        self.attention_dropout, self.layer_idx = dropout, layer_idx
        params = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.scaling = scaling if scaling is not None else yarn_apply_mscale(params, self.qk_head_dim**-0.5)
        # plain data, not a buffer: models built on the meta device would not restore a non-persistent buffer
        self.rope_pairs = None if rope_pairs is None else [list(p) for p in rope_pairs]

        q_out = num_heads * self.qk_head_dim
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, q_out, bias=q_bias)
        else:
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=attention_bias)
            self.q_a_layernorm = RMSNorm(hidden_size=q_lora_rank, eps=norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, q_out, bias=q_bias)
        rope_width = num_rope_heads * qk_rope_head_dim
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + rope_width, bias=attention_bias)
        self.kv_a_layernorm = RMSNorm(hidden_size=kv_lora_rank, eps=norm_eps) if latent_norm else nn.Identity()
        self.kv_b_proj = nn.Linear(kv_lora_rank, self.num_kv_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=attention_bias)
        if qk_norm:
            self.q_norm = RMSNorm(hidden_size=self.qk_head_dim, eps=norm_eps)
            self.k_norm = RMSNorm(hidden_size=self.qk_head_dim, eps=norm_eps)
        self.norm_eps = norm_eps
        rope = {
            "head_dim": self.rope_table_dim,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": max_position_embeddings,
        }
        self.rotary_emb = LlamaRotaryEmbedding(rope_config(**rope))
        self.rope_signature = rope_signature(**rope)  # host models pass their (cos, sin) iff this matches

    def deepnorm_weights(self) -> list[torch.Tensor]:
        """DeepNet's beta-scaled weights: the value rows of ``kv_b_proj`` (``[Hkv, dv, r]``) and ``o_proj``."""
        weight = self.kv_b_proj.weight
        with torch.no_grad():
            values = weight.view(self.num_kv_heads, -1, self.kv_lora_rank)[:, self.qk_nope_head_dim :]
        if getattr(weight, "_is_hf_initialized", False):  # loaded weights stay as they are
            values._is_hf_initialized = True
        return [values, self.o_proj.weight]

    # ------------------------------------------------------------------------------------------------------
    # projections
    # ------------------------------------------------------------------------------------------------------

    def cache_elements_per_token(self) -> int:
        """Elements this layer caches per token: latent, RoPE key(s) and, with ``qk_norm``, the key scales."""
        return (
            self.kv_lora_rank
            + self.num_rope_heads * self.qk_rope_head_dim
            + (self.num_kv_heads if self.qk_norm else 0)
        )

    def _query(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, T, hidden] -> [B, H, T, dq]`` (q-normed when ``qk_norm``, before RoPE)."""
        if self.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q = q.view(*hidden.shape[:2], self.num_heads, self.qk_head_dim)
        if self.qk_norm:
            q = self.q_norm(q)
        return q.transpose(1, 2)

    def _key_scale(self, k_nope: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """Per-token ``1 / rms`` of each kv head's ``[k_nope | k_rope]`` (``[B, T, Hkv, *]`` each): ``[B, T, Hkv]``."""
        square = k_nope.float().pow(2).sum(-1) + k_rope.float().pow(2).sum(-1)
        return torch.rsqrt(square / self.qk_head_dim + self.norm_eps)

    def _write(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Cache entries of new tokens: latent ``[B, T, r]``, rotated RoPE key ``[B, T, R, dr]``, key scales.

        The scales ``[B, T, Hkv]`` exist with ``qk_norm`` only (else ``None``).
        """
        bsz, q_len = hidden.shape[:2]
        latent, k_rope = self.kv_a_proj_with_mqa(hidden).split(
            [self.kv_lora_rank, self.num_rope_heads * self.qk_rope_head_dim], dim=-1
        )
        latent = self.kv_a_layernorm(latent)
        k_rope = k_rope.view(bsz, q_len, self.num_rope_heads, self.qk_rope_head_dim)
        scale = None
        if self.qk_norm:
            k_nope = self.kv_b_proj(latent).view(bsz, q_len, self.num_kv_heads, -1)[..., : self.qk_nope_head_dim]
            scale = self._key_scale(k_nope, k_rope)
            gamma_rope = self.k_norm.weight[self.qk_nope_head_dim :]
            k_rope = gamma_rope * (k_rope.float() * scale[..., None]).to(k_rope.dtype)
        k_rope = self._rotate(k_rope.transpose(1, 2)[:, :, None], cos, sin)[:, :, 0].transpose(1, 2)
        return latent, k_rope, scale

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on ``x [B, R, m, T, dr]`` (m heads per RoPE head) with the host's ``cos``/``sin [B, T, table]``."""
        n = self.qk_rope_head_dim // 2
        if n == 0:
            return x
        if cos.shape[-1] != self.rope_table_dim:
            raise ValueError(
                f"position_embeddings have head dim {cos.shape[-1]}, this MLA block expects {self.rope_table_dim}"
            )
        half = self.rope_table_dim // 2
        if self.rope_pairs is not None:  # (B, T, half) -> (B, R, 1, T, n): each RoPE head's own frequencies
            pairs = torch.tensor(self.rope_pairs, dtype=torch.long, device=cos.device)
            cos = cos[..., :half][..., pairs].permute(0, 2, 1, 3)[:, :, None]
            sin = sin[..., :half][..., pairs].permute(0, 2, 1, 3)[:, :, None]
        else:
            cos, sin = cos[:, None, None, :, :n], sin[:, None, None, :, :n]
        if self.rope_interleave:  # adjacent pairs in, rotate-half layout out (as DeepSeek-V3 in transformers)
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x[..., :n], x[..., n:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    # ------------------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------------------

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
        """``hidden_states [B, T, hidden]`` -> ``(out [B, T, hidden], None)``; see the module docstring."""
        cache = cache if cache is not None else past_key_values
        bsz, q_len, _ = hidden_states.shape
        if position_embeddings is None:
            if position_ids is None:
                past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
                position_ids = torch.arange(past, past + q_len, device=hidden_states.device)[None]
            position_embeddings = self.rotary_emb(hidden_states, position_ids)
        cos, sin = position_embeddings

        query = self._query(hidden_states)  # (B, H, T, dq)
        q_nope, q_rope = query.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_rope = self._rotate(q_rope.unflatten(1, (self.num_rope_heads, -1)), cos, sin).flatten(1, 2)
        latent, k_rope, scale = self._write(hidden_states, cos, sin)
        if cache is not None:
            packed = k_rope.flatten(2) if scale is None else torch.cat([k_rope.flatten(2), scale.to(k_rope.dtype)], -1)
            latent, packed = cache.update(latent[:, None], packed[:, None], self.layer_idx)
            latent, packed = latent[:, 0], packed[:, 0]  # (B, Tk, r), (B, Tk, R*dr [+ Hkv])
            rope_width = self.num_rope_heads * self.qk_rope_head_dim
            k_rope = packed[..., :rope_width].unflatten(-1, (self.num_rope_heads, self.qk_rope_head_dim))
            scale = packed[..., rope_width:].float() if self.qk_norm else None
        absorbed = self.absorb == "always" or (self.absorb == "auto" and latent.shape[1] > q_len)
        attend = self._attend_absorbed if absorbed else self._attend_expanded
        out = attend(q_nope, q_rope, latent, k_rope, scale, attention_mask)  # (B, T, H, dv)
        return self.o_proj(out.reshape(bsz, q_len, -1)), None

    def attend(self, query, key, value, attention_mask, **kwargs):
        """SDPA over expanded keys/values: ``q [B, H, T, dq]``, ``k [B, Hkv, Tk, dq]``, ``v [B, Hkv, Tk, dv]``."""
        return sdpa_attention(self, query, key, value, attention_mask, **kwargs)

    def _attend_expanded(self, q_nope, q_rope, latent, k_rope, scale, attention_mask):
        """Expand the latent to per-head keys/values once and run SDPA (prefill / training)."""
        bsz, kv_len = latent.shape[:2]
        kv = self.kv_b_proj(latent).view(bsz, kv_len, self.num_kv_heads, -1)
        k_nope, value = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        if self.qk_norm:
            gamma_nope = self.k_norm.weight[: self.qk_nope_head_dim]
            k_nope = gamma_nope * (k_nope.float() * scale[..., None]).to(k_nope.dtype)
        k_rope = k_rope.expand(bsz, kv_len, self.num_kv_heads, self.qk_rope_head_dim)
        key = torch.cat([k_nope, k_rope], dim=-1).transpose(1, 2)  # (B, Hkv, Tk, dq)
        query = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, dq)
        dropout = self.attention_dropout if self.training else 0.0
        out, _ = self.attend(query, key, value.transpose(1, 2), attention_mask, dropout=dropout, scaling=self.scaling)
        return out

    def _attend_absorbed(self, q_nope, q_rope, latent, k_rope, scale, attention_mask):
        """Attention in the latent space: ``W_UK`` folded into the query, ``W_UV`` applied after (decoding)."""
        bsz, n_heads, q_len, _ = q_nope.shape
        kv_len, groups = latent.shape[1], self.num_key_value_groups
        weight = self.kv_b_proj.weight.view(self.num_kv_heads, -1, self.kv_lora_rank)
        w_uk, w_uv = weight[:, : self.qk_nope_head_dim], weight[:, self.qk_nope_head_dim :]  # (Hkv, dn|dv, r)
        if self.qk_norm:
            q_nope = q_nope * self.k_norm.weight[: self.qk_nope_head_dim]
        q_nope = q_nope.view(bsz, self.num_kv_heads, groups, q_len, -1)
        q_latent = torch.einsum("bhgtd,hdr->bhgtr", q_nope, w_uk)  # (B, Hkv, G, T, r)
        scores = torch.matmul(q_latent.reshape(bsz, -1, self.kv_lora_rank), latent.transpose(1, 2))  # (B, H*T, Tk)
        scores = scores.view(bsz, self.num_kv_heads, groups * q_len, kv_len)
        if self.qk_norm:
            scores = scores * scale.transpose(1, 2)[:, :, None, :].to(scores.dtype)
        scores = scores.reshape(bsz, n_heads, q_len, kv_len)
        if self.qk_rope_head_dim:
            rope_q = q_rope.reshape(bsz * self.num_rope_heads, -1, self.qk_rope_head_dim)  # (B*R, H/R*T, dr)
            rope_k = k_rope.transpose(1, 2).reshape(bsz * self.num_rope_heads, kv_len, -1)  # (B*R, Tk, dr)
            scores = scores + torch.bmm(rope_q, rope_k.transpose(1, 2)).view(bsz, n_heads, q_len, kv_len)
        scores = scores.float() * self.scaling
        mask = as_bool_mask(attention_mask, q_len, kv_len, scores.device)  # (B|1, 1, T, Tk)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1).masked_fill(~mask, 0.0).to(latent.dtype)
        probs = F.dropout(probs, p=self.attention_dropout if self.training else 0.0, training=self.training)
        context = torch.bmm(probs.view(bsz, -1, kv_len), latent)  # (B, H*T, r)
        context = context.view(bsz, self.num_kv_heads, groups, q_len, self.kv_lora_rank)
        out = torch.einsum("bhgtr,hvr->bhgtv", context, w_uv)  # (B, Hkv, G, T, dv)
        return out.reshape(bsz, n_heads, q_len, self.v_head_dim).transpose(1, 2)

    def extra_repr(self) -> str:
        return (
            f"kv_lora_rank={self.kv_lora_rank}, q_lora_rank={self.q_lora_rank}, heads={self.num_heads}/"
            f"{self.num_kv_heads}/{self.num_rope_heads}, dims={self.qk_nope_head_dim}+{self.qk_rope_head_dim}/"
            f"{self.v_head_dim}, absorb={self.absorb!r}"
        )
