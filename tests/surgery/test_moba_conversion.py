"""Converting trained HF attention to MoBA inside real models: weights kept, exact when blocks cover the input."""

from __future__ import annotations

import pydantic
import pytest
import torch
from transformers import DynamicCache
from utils import assert_close, max_abs_diff, tiny_hf_model

from myllm.surgery.attention import read_attention
from myllm.surgery.moba import moba_state_dict, to_moba


def _batch(seed=0, bsz=3, length=24, pads=(0, 5, 11)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (bsz, length), generator=g)
    mask = torch.ones(bsz, length, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0  # left padding
    return ids, mask


def _moba_model(arch, **kw):
    model = tiny_hf_model(arch)
    for layer in model.model.layers:
        layer.self_attn = to_moba(layer.self_attn, **kw)
    return model


def _logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    return out.masked_fill(~mask.bool()[..., None], 0.0)  # padding positions are not compared


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_moba_model_equals_original_when_blocks_cover_the_input(arch):
    ids, mask = _batch()
    reference = _logits(tiny_hf_model(arch), ids, mask)
    assert_close(_logits(_moba_model(arch, chunk_size=4, top_k=6), ids, mask), reference, atol=1e-5)


def test_sparse_moba_model_differs_from_original():
    """Non-vacuity: with few blocks per query the converted model computes something else."""
    ids, mask = _batch()
    reference = _logits(tiny_hf_model("llama"), ids, mask)
    assert max_abs_diff(_logits(_moba_model("llama", chunk_size=4, top_k=2), ids, mask), reference) > 1e-3


def test_cached_decoding_equals_full_forward_with_sparse_blocks():
    """Prefill, then one token at a time with a DynamicCache: every step selects blocks sparsely."""
    model = _moba_model("qwen2", chunk_size=3, top_k=2)
    ids, mask = _batch(bsz=2, length=20, pads=(0, 4))
    full = _logits(model, ids, mask)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        steps = [model(input_ids=ids[:, :8], attention_mask=mask[:, :8], cache=cache, use_cache=True).logits]
        for t in range(8, 20):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    incremental = torch.cat(steps, 1).masked_fill(~mask.bool()[..., None], 0.0)
    assert_close(incremental, full, atol=1e-5)


def test_two_models_with_different_chunk_sizes_coexist():
    ids, mask = _batch()
    a = _moba_model("llama", chunk_size=3, top_k=2)
    b = _moba_model("llama", chunk_size=5, top_k=2)
    la, lb = _logits(a, ids, mask), _logits(b, ids, mask)
    assert max_abs_diff(la, lb) > 1e-3
    # each model follows its own settings: the dense reference kernel with the same settings agrees
    for model, logits in ((a, la), (b, lb)):
        for layer in model.model.layers:
            layer.self_attn.kernel = "reference"
        assert_close(_logits(model, ids, mask), logits, atol=1e-5)


def test_hybrid_keeps_other_layers_dense():
    model = tiny_hf_model("llama")
    model.model.layers[0].self_attn = to_moba(model.model.layers[0].self_attn, chunk_size=4, top_k=2)
    assert type(model.model.layers[1].self_attn).__name__ == "LlamaAttention"
    ids, mask = _batch()
    assert torch.isfinite(_logits(model, ids, mask)).all()


def test_conversion_keeps_every_weight_and_leaves_the_original_alone():
    model = tiny_hf_model("qwen3")
    attn = model.model.layers[0].self_attn
    before = {k: v.clone() for k, v in attn.state_dict().items()}
    block = to_moba(attn, chunk_size=4, top_k=2)
    assert block.state_dict().keys() == before.keys()
    for k, v in block.state_dict().items():
        assert torch.equal(v, before[k])
    for k, v in attn.state_dict().items():
        assert torch.equal(v, before[k])
    assert moba_state_dict(before).keys() == before.keys()


def test_bad_settings_and_unknown_attention_raise_before_anything_changes():
    model = tiny_hf_model("llama")
    attn = model.model.layers[0].self_attn
    with pytest.raises(pydantic.ValidationError, match="chunk_size"):
        to_moba(attn, chunk_size=0, top_k=2)
    with pytest.raises(pydantic.ValidationError, match="top_k"):
        to_moba(attn, chunk_size=4, top_k=0)
    deepseek = tiny_hf_model("deepseek_v3").model.layers[0].self_attn
    with pytest.raises(TypeError, match="q_proj, k_proj"):
        to_moba(deepseek, chunk_size=4, top_k=2)
    with pytest.raises(TypeError, match="cannot convert"):
        read_attention(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="sliding-window"):
        to_moba(tiny_hf_model("mistral", sliding_window=8).model.layers[0].self_attn, chunk_size=4, top_k=2)
    with pytest.raises(KeyError, match="missing"):
        moba_state_dict({"q_proj.weight": torch.zeros(1)})


def test_myllm_gqa_block_converts_to_moba():
    from myllm import blocks

    block = blocks.build("attention", "sdpa", hidden_size=32, num_heads=4, num_kv_heads=2, qk_norm=True).eval()
    moba = to_moba(block, chunk_size=4, top_k=5).eval()
    x = torch.randn(2, 20, 32)
    with torch.no_grad():
        assert max_abs_diff(moba(x)[0], block(x)[0]) <= 1e-5
