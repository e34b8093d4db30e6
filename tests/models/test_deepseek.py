"""DeepSeek-V3 import/export through the ``mla`` block and the ``latent`` cache."""

from __future__ import annotations

import pytest
import torch
from utils import max_abs_diff, tiny_hf_model

from myllm.blocks.attention.mla import MLAttention
from myllm.blocks.cache.latent import LatentCache
from myllm.models.convert import from_hf, to_hf


def _batch():
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("q_lora_rank", [None, 12], ids=["q_proj", "q_lora"])
def test_from_hf_deepseek_v3_keeps_logits_and_greedy_generation(q_lora_rank):
    hf = tiny_hf_model("deepseek_v3", first_k_dense_replace=2, q_lora_rank=q_lora_rank)  # dense layers
    ids, mask = _batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
    ours = from_hf(hf)
    assert all(isinstance(layer.self_attn, MLAttention) for layer in ours.model.layers)
    with torch.no_grad():
        logits = ours(input_ids=ids, attention_mask=mask).logits
        assert max_abs_diff(logits[mask.bool()], expected[mask.bool()]) <= 1e-5
        generated = ours.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False))
    cache = ours.config.build_cache()
    assert isinstance(cache, LatentCache)
    with torch.no_grad():
        ours(input_ids=ids, cache=cache, use_cache=True)
    assert cache.bytes_per_token() == 2 * (16 + 8) * 4  # per token: latent + RoPE key of each layer


def test_to_hf_deepseek_v3_round_trip():
    hf = tiny_hf_model("deepseek_v3", first_k_dense_replace=2)
    ids, mask = _batch()
    back = to_hf(from_hf(hf))
    assert type(back).__name__ == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        a = back(input_ids=ids, attention_mask=mask).logits
        b = hf(input_ids=ids, attention_mask=mask).logits
    assert max_abs_diff(a, b) <= 1e-6


def test_moe_layers_import_through_the_moe_converter():
    """(Refused before the MoE mapping landed; parity of MoE layers: tests/models/test_moe_convert.py.)"""
    ours = from_hf(tiny_hf_model("deepseek_v3"))  # first_k_dense_replace=1: layer 1 is MoE
    assert type(ours.model.layers[1].mlp).__name__ == "MoE"
