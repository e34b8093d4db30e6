"""Norm and FFN blocks against the Hugging Face modules they replace (outputs and gradients); DeepNorm maths."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from utils import assert_close, max_abs_diff

from myllm import blocks
from myllm.blocks.norm import deepnorm_init_


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("dim", [16, 60])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rmsnorm_matches_llama_rmsnorm(dim, dtype):
    hf = LlamaRMSNorm(dim, eps=1e-5).to(dtype)
    ours = blocks.build("norm", "rmsnorm", hidden_size=dim, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(dim))
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(3, 7, dim, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = hf(x1), ours(x2)
    assert torch.equal(y1, y2)  # bit for bit
    y1.float().pow(2).sum().backward()
    y2.float().pow(2).sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(hf.weight.grad, ours.weight.grad)


def test_rmsnorm_weight_change_is_detected():
    hf, ours = LlamaRMSNorm(16), blocks.build("norm", "rmsnorm", hidden_size=16)
    with torch.no_grad():
        ours.weight[0] += 1e-3
    x = torch.randn(2, 16)
    assert max_abs_diff(hf(x), ours(x)) > 0


def test_layernorm_matches_torch():
    ref = torch.nn.LayerNorm(24, eps=1e-5)
    ours = blocks.build("norm", "layernorm", hidden_size=24, eps=1e-5)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 24)
    assert_close(ours(x), ref(x), atol=1e-6)
    assert ours.placement == "pre" and ours.residual_alpha == 1.0


@pytest.mark.parametrize("n_layers", [1, 8, 24])
def test_deepnorm_constants_follow_the_paper(n_layers):
    norm = blocks.build("norm", "deepnorm", hidden_size=8, num_layers=n_layers)
    assert norm.placement == "post"
    assert norm.residual_alpha == pytest.approx((2 * n_layers) ** 0.25)
    assert norm.init_beta == pytest.approx((8 * n_layers) ** -0.25)
    if n_layers == 8:  # the paper's worked example: M = 8 -> alpha = 2, beta ~ 0.354
        assert norm.residual_alpha == pytest.approx(2.0) and norm.init_beta == pytest.approx(0.3536, abs=1e-4)


def test_deepnorm_init_scales_xavier_by_beta_per_matrix_and_skips_loaded_weights():
    torch.manual_seed(0)
    w = torch.empty(256, 512)
    experts = torch.empty(4, 128, 256)
    loaded = torch.full((8, 8), 3.0)
    loaded._is_hf_initialized = True
    deepnorm_init_([w, experts, loaded], beta=0.5)
    assert w.std().item() == pytest.approx(0.5 * math.sqrt(2 / (256 + 512)), rel=0.05)
    for e in experts:  # fused experts: fan-in/out per expert matrix
        assert e.std().item() == pytest.approx(0.5 * math.sqrt(2 / (128 + 256)), rel=0.05)
    assert (loaded == 3.0).all()


@pytest.mark.parametrize("bias", [False, True])
def test_dense_ffn_matches_llama_mlp(bias):
    config = LlamaConfig(
        hidden_size=20, num_attention_heads=5, head_dim=4, intermediate_size=36, mlp_bias=bias, hidden_act="silu"
    )
    hf = LlamaMLP(config)
    ours = blocks.build("ffn", "dense", hidden_size=20, intermediate_size=36, bias=bias, act="silu")
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 5, 20)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = hf(x1), ours(x2)
    assert_close(y2, y1, atol=1e-6)
    y1.pow(2).sum().backward()
    y2.pow(2).sum().backward()
    assert_close(x2.grad, x1.grad, atol=1e-6)
    ref = _grads(hf)
    for name, g in _grads(ours).items():
        assert_close(g, ref[name], atol=1e-6)


def test_dense_ffn_weight_change_is_detected():
    config = LlamaConfig(hidden_size=20, num_attention_heads=5, head_dim=4, intermediate_size=36)
    hf = LlamaMLP(config)
    ours = blocks.build("ffn", "dense", hidden_size=20, intermediate_size=36)
    ours.load_state_dict(hf.state_dict())
    with torch.no_grad():
        ours.up_proj.weight[0, 0] += 1e-2
    x = torch.randn(3, 20)
    assert max_abs_diff(hf(x), ours(x)) > 1e-6


def test_plain_mlp_has_no_gate_and_uses_the_activation():
    ffn = blocks.build("ffn", "dense", hidden_size=8, intermediate_size=16, gated=False, act="gelu", bias=True)
    assert not hasattr(ffn, "gate_proj")
    x = torch.randn(3, 8)
    expected = ffn.down_proj(torch.nn.functional.gelu(ffn.up_proj(x)))
    assert_close(ffn(x), expected, atol=1e-6)
