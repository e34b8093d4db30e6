"""The ``moe`` block against real HF MoE blocks: outputs, gradients, router logits, and the swap into an HF model.

Each parity check is paired with a perturbed-router check proving a routing difference is detected.
"""

from __future__ import annotations

import pytest
import torch
from utils import assert_close, hf_moe_block, max_abs_diff, tiny_hf_model

from myllm.blocks.ffn.moe import MoE
from myllm.blocks.ffn.moe.hf import moe_kwargs_from_hf, moe_state_dict_from_hf

ARCHS = ["qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3"]


def _ours_from(hf_block: torch.nn.Module, **kw) -> MoE:
    cfg = hf_block.experts.config
    block = MoE(**{**moe_kwargs_from_hf(cfg), **kw})
    block.load_state_dict(moe_state_dict_from_hf(cfg.model_type, hf_block.state_dict()), strict=True)
    return block.eval()


@pytest.mark.parametrize("impl", ["grouped", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_block_matches_hf_outputs_and_gradients(arch, impl):
    hf = hf_moe_block(arch)
    ours = _ours_from(hf, experts_impl=impl)
    x = torch.randn(3, 11, hf.experts.config.hidden_size)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf, y = hf(x_hf), ours(x_ours)
    assert y_hf.abs().mean() > 0.1  # O(1) outputs: the tolerance below is meaningful
    assert_close(y, y_hf, atol=1e-5)
    upstream = torch.randn_like(y)
    (y_hf * upstream).sum().backward()
    (y * upstream).sum().backward()
    assert_close(x_ours.grad, x_hf.grad, atol=1e-5)
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        hf_name = name.replace("shared_experts.", "shared_expert.") if arch == "qwen2_moe" else name
        assert_close(p.grad, hf_grads[hf_name].grad, atol=2e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_router_logits_match_hf(arch):
    hf = hf_moe_block(arch)
    ours = _ours_from(hf)
    x = torch.randn(2, 5, hf.experts.config.hidden_size)
    ours(x)
    hf_logits, _, hf_idx = hf.gate(x.view(-1, x.shape[-1]))
    assert_close(ours.last_router_logits, hf_logits.float(), atol=1e-6)
    assert ours.last_router_logits.shape == (10, ours.n_experts)
    assert torch.equal(ours.records[-1].route.indices.sort(-1).values, hf_idx.sort(-1).values)


@pytest.mark.parametrize("arch", ARCHS)
def test_perturbed_router_is_detected(arch):
    """Non-vacuity of the parity test: a small router change moves the output past the tolerance."""
    hf = hf_moe_block(arch)
    ours = _ours_from(hf)
    x = torch.randn(3, 11, hf.experts.config.hidden_size)
    with torch.no_grad():
        ours.gate.weight[0] += 0.05
    assert max_abs_diff(ours(x), hf(x)) > 1e-4


def test_deepseek_selection_bias_is_used():
    """Non-vacuity for DeepSeek's bias: zeroing it (as a careless import would) changes the output."""
    hf = hf_moe_block("deepseek_v3")
    ours = _ours_from(hf)
    x = torch.randn(3, 11, hf.experts.config.hidden_size)
    with torch.no_grad():
        ours.gate.e_score_correction_bias.zero_()
    assert max_abs_diff(ours(x), hf(x)) > 1e-4


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral", "deepseek_v3"])
def test_swapped_into_an_hf_model_keeps_the_logits(arch):
    """Instance-level replacement of every HF MoE block keeps the model's logits (and a bad swap does not)."""
    model = tiny_hf_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp = _ours_from(layer.mlp)
        assert_close(model(ids).logits, ref, atol=1e-5)
        moe = next(layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE))
        moe.experts.down_proj.mul_(1.01)
        assert max_abs_diff(model(ids).logits, ref) > 1e-5


def test_accepts_flat_tokens_and_rejects_a_wrong_hidden_size():
    ours = _ours_from(hf_moe_block("mixtral"))
    x = torch.randn(2, 5, 32)
    assert_close(ours(x.view(10, 32)), ours(x).view(10, 32), atol=0)
    with pytest.raises(ValueError, match="hidden size 32"):
        ours(torch.randn(2, 5, 16))
