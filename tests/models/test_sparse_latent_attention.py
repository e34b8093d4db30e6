"""MoBA and MLA blocks inside ``MyLLMConfig`` models: hybrid layers, caches, save/load, DeepNorm."""

from __future__ import annotations

import pytest
import torch
from utils import TINY_MYLLM, assert_close, max_abs_diff, tiny_myllm

from myllm import MyLLMForCausalLM
from myllm.blocks.attention.mla import MLAttention
from myllm.blocks.attention.moba import MobaAttention
from myllm.blocks.cache.latent import LatentCache

MOBA = {"name": "moba", "chunk_size": 3, "top_k": 2}
MLA = {"name": "mla", "kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8}


def _batch(t=14):
    ids = torch.randint(0, TINY_MYLLM["vocab_size"], (2, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, t, dtype=torch.long)
    mask[1, :4] = 0
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


CONFIGS = {
    "moba-hybrid": {"attention": MOBA, "layer_overrides": {"1": {"attention": {"name": "sdpa"}}}},
    "mla-latent-cache": {"attention": MLA, "kv_cache": "latent"},
    "mla-own-rope": {"attention": {**MLA, "qk_rope_head_dim": 4}, "kv_cache": "latent"},  # host RoPE not shared
}


@pytest.mark.parametrize("name", CONFIGS, ids=list(CONFIGS))
def test_cached_decoding_equals_the_full_forward(name):
    model = tiny_myllm(**CONFIGS[name])
    ids, mask = _batch()
    full = _logits(model, ids, mask)
    with torch.no_grad():
        cache = model.config.build_cache()
        steps = [model(input_ids=ids[:, :6], attention_mask=mask[:, :6], cache=cache, use_cache=True).logits]
        for t in range(6, ids.shape[1]):
            step = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
            steps.append(step.logits)
    assert_close(torch.cat(steps, 1)[mask.bool()], full, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS, ids=list(CONFIGS))
def test_save_and_load_rebuild_the_same_blocks(name, tmp_path):
    model = tiny_myllm(**CONFIGS[name])
    model.save_pretrained(tmp_path)
    loaded = MyLLMForCausalLM.from_pretrained(tmp_path).eval()
    assert [type(layer.self_attn) for layer in loaded.model.layers] == [
        type(layer.self_attn) for layer in model.model.layers
    ]
    ids, mask = _batch()
    assert_close(_logits(loaded, ids, mask), _logits(model, ids, mask), atol=0.0)


def test_moba_layers_with_covering_blocks_equal_sdpa_layers_with_the_same_weights():
    dense = tiny_myllm()
    ids, mask = _batch()
    covering = tiny_myllm(attention={"name": "moba", "chunk_size": 4, "top_k": 4})
    covering.load_state_dict(dense.state_dict(), strict=True)  # MoBA has exactly the GQA parameters
    assert isinstance(covering.model.layers[0].self_attn, MobaAttention)
    assert max_abs_diff(_logits(covering, ids, mask), _logits(dense, ids, mask)) <= 1e-5
    sparse = tiny_myllm(attention={"name": "moba", "chunk_size": 2, "top_k": 2})
    sparse.load_state_dict(dense.state_dict(), strict=True)
    assert max_abs_diff(_logits(sparse, ids, mask), _logits(dense, ids, mask)) > 1e-4  # non-vacuity


def test_mla_model_shares_the_host_rope_only_when_it_matches():
    shared = tiny_myllm(attention=MLA)
    own = tiny_myllm(attention={**MLA, "qk_rope_head_dim": 4})
    assert shared.model.shares_rope(shared.model.layers[0].self_attn)
    assert not own.model.shares_rope(own.model.layers[0].self_attn)


@pytest.mark.parametrize("attention", [MOBA, MLA], ids=["moba", "mla"])
def test_deepnorm_initialises_the_new_blocks(attention):
    model = tiny_myllm(attention=attention, norm="deepnorm")
    ids, mask = _batch()
    assert torch.isfinite(_logits(model, ids, mask)).all()
    assert model.model.layers[0].deepnorm_initialised


def test_mla_deepnorm_weights_are_the_value_rows_and_the_output_projection():
    attn = tiny_myllm(attention=MLA).model.layers[0].self_attn  # 2 kv heads (the config's num_key_value_heads)
    assert isinstance(attn, MLAttention)
    values, o_proj = attn.deepnorm_weights()
    assert values.shape == (2, 8, 12) and o_proj is attn.o_proj.weight
    assert values.data_ptr() == attn.kv_b_proj.weight.data_ptr() + 8 * 12 * 4  # a view, after the key rows


def test_generate_uses_the_latent_cache_block():
    model = tiny_myllm(**CONFIGS["mla-latent-cache"])
    assert isinstance(model.config.build_cache(), LatentCache)
    ids, mask = _batch()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 4)
