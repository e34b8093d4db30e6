"""Attention blocks against the Hugging Face modules they replace (outputs and gradients), RoPE types, kernels."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config
from transformers.masking_utils import eager_mask, sdpa_mask
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention
from utils import assert_close, max_abs_diff

from myllm import blocks
from myllm.blocks.attention.kernels import eager_attention, sdpa_attention

H, NH = 32, 4

# (HF attention class, HF config class, config overrides, our block kwargs)
HF_ATTENTIONS = {
    "llama-gqa": (LlamaAttention, LlamaConfig, {"num_key_value_heads": 2}, {"num_kv_heads": 2}),
    "llama-mqa-bias": (
        LlamaAttention,
        LlamaConfig,
        {"num_key_value_heads": 1, "attention_bias": True},
        {"num_kv_heads": 1, "qkv_bias": True, "o_bias": True},
    ),
    "qwen2": (Qwen2Attention, Qwen2Config, {"num_key_value_heads": 2}, {"num_kv_heads": 2, "qkv_bias": True}),
    "qwen3-headdim": (
        Qwen3Attention,
        Qwen3Config,
        {"num_key_value_heads": 2, "head_dim": 12},
        {"num_kv_heads": 2, "head_dim": 12, "qk_norm": True},
    ),
}


def _hf_attention(key: str, impl: str):
    cls, cfg_cls, overrides, ours = HF_ATTENTIONS[key]
    config = cfg_cls(hidden_size=H, num_attention_heads=NH, intermediate_size=64, **overrides)
    config._attn_implementation = impl
    hf = cls(config, layer_idx=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if p.dim() == 1 else 0.0))
    eps = getattr(config, "rms_norm_eps", 1e-6)
    return hf, config, {"hidden_size": H, "num_heads": NH, "norm_eps": eps, **ours}


def _mask(impl: str, pad: torch.Tensor, q_len: int) -> torch.Tensor:
    fn = eager_mask if impl == "eager" else sdpa_mask
    return fn(
        batch_size=pad.shape[0], q_length=q_len, kv_length=q_len, attention_mask=pad.bool(), allow_is_causal_skip=False
    )


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("key", list(HF_ATTENTIONS))
def test_attention_matches_hf_module_outputs_and_gradients(key, impl):
    hf, config, kwargs = _hf_attention(key, impl)
    ours = blocks.build("attention", impl, **kwargs)
    ours.load_state_dict(hf.state_dict())  # same parameter names
    T = 7
    x = torch.randn(2, T, H)
    pad = torch.ones(2, T, dtype=torch.long)
    pad[1, :2] = 0  # left padding in row 1
    mask = _mask(impl, pad, T)
    pos = torch.arange(T)[None].expand(2, -1)
    cos_sin = LlamaRotaryEmbedding(config)(x, pos)

    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_hf, _ = hf(x1, position_embeddings=cos_sin, attention_mask=mask)
    out, _ = ours(x2, position_embeddings=cos_sin, attention_mask=mask)
    real = pad.bool()  # padded query rows differ by design (HF eager averages them, we return zeros)
    assert_close(out[real], out_hf[real], atol=1e-5)
    (out_hf[real].pow(2).sum()).backward()
    (out[real].pow(2).sum()).backward()
    assert_close(x2.grad, x1.grad, atol=1e-4)
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, hf_grads[name].grad, atol=1e-4)


def test_attention_parity_is_not_vacuous():
    hf, config, kwargs = _hf_attention("qwen3-headdim", "sdpa")
    ours = blocks.build("attention", "sdpa", **kwargs)
    ours.load_state_dict(hf.state_dict())
    with torch.no_grad():
        ours.k_norm.weight[3] += 1e-3  # a tiny change in one per-head norm weight
    x = torch.randn(2, 5, H)
    cos_sin = LlamaRotaryEmbedding(config)(x, torch.arange(5)[None])
    assert (
        max_abs_diff(
            ours(x, position_embeddings=cos_sin)[0], hf(x, position_embeddings=cos_sin, attention_mask=None)[0]
        )
        > 1e-6
    )


ROPE_TYPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
}


@pytest.mark.parametrize("rope", list(ROPE_TYPES))
def test_rope_types_match_hf_rotary_embedding(rope):
    """Our block's RoPE (transformers' ROPE_INIT_FUNCTIONS) equals LlamaRotaryEmbedding of a full LlamaConfig,
    including positions past max_position_embeddings (where dynamic NTK rescales)."""
    max_pos = 64
    hf_config = LlamaConfig(
        hidden_size=H, num_attention_heads=NH, rope_parameters=dict(ROPE_TYPES[rope]), max_position_embeddings=max_pos
    )
    hf_rope = LlamaRotaryEmbedding(hf_config)
    ours = blocks.build(
        "attention",
        "sdpa",
        hidden_size=H,
        num_heads=NH,
        rope_parameters=dict(ROPE_TYPES[rope]),
        max_position_embeddings=max_pos,
    )
    x = torch.randn(1, 3, H)
    for length in (16, 100):  # inside and beyond max_position_embeddings
        pos = torch.arange(length)[None]
        for a, b in zip(ours.rotary_emb(x, pos), hf_rope(x, pos), strict=True):
            assert_close(a, b, atol=1e-6)
    # and through the block: no position_embeddings given -> the block applies its own RoPE
    hf_attn = LlamaAttention(hf_config, layer_idx=0)
    hf_config._attn_implementation = "sdpa"
    hf_attn.load_state_dict(ours.state_dict())
    x = torch.randn(2, 9, H)
    pos = torch.arange(9)[None]
    assert_close(ours(x)[0], hf_attn(x, position_embeddings=hf_rope(x, pos), attention_mask=None)[0], atol=1e-5)


def test_rope_type_change_is_detected():
    kw = {"hidden_size": H, "num_heads": NH, "max_position_embeddings": 64}
    a = blocks.build("attention", "sdpa", rope_parameters=dict(ROPE_TYPES["default"]), **kw)
    b = blocks.build("attention", "sdpa", rope_parameters=dict(ROPE_TYPES["linear"]), **kw)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 8, H)
    assert max_abs_diff(a(x)[0], b(x)[0]) > 1e-4


def _qkv(b=2, h=4, hk=2, tq=5, tk=5, d=8):
    q = torch.randn(b, h, tq, d, requires_grad=True)
    k = torch.randn(b, hk, tk, d, requires_grad=True)
    v = torch.randn(b, hk, tk, d, requires_grad=True)
    return q, k, v


class _Host(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


@pytest.mark.parametrize("form", ["bool", "float", "none"])
def test_eager_and_sdpa_kernels_agree_for_every_mask_form(form):
    q, k, v = _qkv()
    pad = torch.ones(2, 5, dtype=torch.long)
    pad[1, :2] = 0
    masks = {
        "bool": sdpa_mask(
            batch_size=2, q_length=5, kv_length=5, attention_mask=pad.bool(), allow_is_causal_skip=False
        ),
        "float": eager_mask(batch_size=2, q_length=5, kv_length=5, attention_mask=pad.bool()),
        "none": None,
    }
    host = _Host()
    a, _ = eager_attention(host, q, k, v, masks[form])
    b, _ = sdpa_attention(host, q, k, v, masks[form])
    rows = torch.ones(2, 5, dtype=torch.bool) if form == "none" else pad.bool()  # fully masked rows differ for float
    assert_close(a[rows], b[rows], atol=1e-5)


@pytest.mark.parametrize("kernel", [eager_attention, sdpa_attention])
def test_fully_masked_rows_are_zero_and_finite_in_forward_and_backward(kernel):
    q, k, v = _qkv()
    pad = torch.ones(2, 5, dtype=torch.long)
    pad[1] = 0  # row 1 is all padding
    mask = sdpa_mask(batch_size=2, q_length=5, kv_length=5, attention_mask=pad.bool(), allow_is_causal_skip=False)
    out, _ = kernel(_Host(), q, k, v, mask)
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
