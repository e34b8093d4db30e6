"""Attention replacement eager <-> sdpa inside real HF models: same weights, same outputs and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from utils import TINY_CONFIGS, assert_close, max_abs_diff, tiny_hf_model, tokens

import myllm  # noqa: F401
from myllm.blocks.attention import EagerAttention, SdpaAttention
from myllm.factory import MoveError, replace

GQA_ARCHS = [a for a in TINY_CONFIGS if a != "deepseek_v3"]
BLOCKS = {"eager": EagerAttention, "sdpa": SdpaAttention}


def _inputs():
    ids = tokens(2, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    return ids, mask


def _loss_and_grads(model, ids, mask):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    (logits.float().pow(2) * mask[..., None]).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("block", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", GQA_ARCHS)
def test_hf_attention_to_block_keeps_outputs_and_gradients(arch, block):
    reference = tiny_hf_model(arch, attn_implementation=block)
    model = copy.deepcopy(reference)
    ids, mask = _inputs()
    ref_logits, ref_grads = _loss_and_grads(reference, ids, mask)

    old = [layer.self_attn for layer in model.model.layers]
    replace(model, "attention", block)
    for i, layer in enumerate(model.model.layers):
        assert type(layer.self_attn) is BLOCKS[block]
        assert layer.self_attn.layer_idx == i
        # weights are shared, not copied: same parameter objects as the HF module had
        assert layer.self_attn.q_proj.weight is old[i].q_proj.weight
    logits, grads = _loss_and_grads(model, ids, mask)
    # padded query rows are fully masked: HF eager spreads them uniformly, myllm zeroes them (no NaN);
    # they influence nothing else, so compare real tokens only (the loss is masked the same way)
    keep = mask.bool()
    assert_close(logits[keep], ref_logits[keep], atol=2e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert_close(grads[name], g, atol=2e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_eager_to_sdpa_and_back_on_our_blocks(arch):
    model = tiny_hf_model(arch)
    ids, mask = _inputs()
    ref = model(input_ids=ids, attention_mask=mask).logits
    replace(model, "attention", "eager")
    replace(model, "attention", "sdpa", layers=[1])
    assert type(model.model.layers[0].self_attn) is EagerAttention
    assert type(model.model.layers[1].self_attn) is SdpaAttention
    assert_close(model(input_ids=ids, attention_mask=mask).logits, ref, atol=2e-6)
    assert [e["name"] for e in model.config.myllm_surgeries] == ["eager", "sdpa"]


def test_attention_check_detects_a_real_change():
    """Non-vacuity: the tolerance used above is far below the effect of a small weight change."""
    model = tiny_hf_model("qwen2")
    ids, mask = _inputs()
    ref = model(input_ids=ids, attention_mask=mask).logits
    replace(model, "attention", "sdpa")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] += 0.05
    assert max_abs_diff(model(input_ids=ids, attention_mask=mask).logits, ref) > 1e-4


def test_kv_cache_generation_matches_after_swap():
    model = tiny_hf_model("mistral")
    ids = tokens(1, 5)
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    replace(model, "attention", "eager")
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)


def test_mla_attention_weights_do_not_fit_gqa_blocks():
    model = tiny_hf_model("deepseek_v3")
    with pytest.raises(MoveError, match=r"do not fit attention/sdpa.*(missing|not used)"):
        replace(model, "attention", "sdpa")
    assert not hasattr(model.config, "myllm_surgeries")
