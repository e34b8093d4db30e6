"""The ``mla`` attention block: parity with transformers' DeepseekV3Attention, absorbed == expanded, options."""

from __future__ import annotations

import pydantic
import pytest
import torch
from transformers import DynamicCache
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding
from utils import assert_close, max_abs_diff, tiny_hf_config, tiny_hf_model

from myllm import blocks
from myllm.blocks.attention.mla import MLAttention
from myllm.blocks.cache.latent import LatentCache

DEEPSEEK_SIZES = {"hidden_size": 32, "num_heads": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8}


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _padded_mask(bsz, q_len, kv_len, pads):
    mask = torch.ones(bsz, 1, q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    for b, p in enumerate(pads):
        mask[b, ..., :p] = False
    return mask


def _steps(module_call, x, pe_of, mask, split):
    """Prefill ``[:split]`` then decode one token at a time; returns the concatenated outputs."""
    outs = [module_call(x[:, :split], pe_of(0, split), mask[:, :, :split, :split])]
    for t in range(split, x.shape[1]):
        outs.append(module_call(x[:, t : t + 1], pe_of(t, t + 1), mask[:, :, t : t + 1, : t + 1]))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("q_lora_rank", [None, 12], ids=["q_proj", "q_lora"])
@pytest.mark.parametrize("interleave", [True, False], ids=["interleave", "rotate_half"])
def test_matches_hf_deepseek_v3_attention_prefill_and_decode(q_lora_rank, interleave):
    config = tiny_hf_config("deepseek_v3", q_lora_rank=q_lora_rank, rope_interleave=interleave)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = DeepseekV3Attention(config, layer_idx=0).eval()
    _perturb(hf)
    mla = blocks.build(
        "attention", "mla", v_head_dim=8, q_lora_rank=q_lora_rank, rope_interleave=interleave, **DEEPSEEK_SIZES
    ).eval()
    mla.load_state_dict(hf.state_dict(), strict=True)  # HF weights load unchanged
    rotary = DeepseekV3RotaryEmbedding(config)
    x = torch.randn(2, 11, 32)
    mask = _padded_mask(2, 11, 11, [0, 3])

    def pe_of(a, b):
        return rotary(x, torch.arange(a, b)[None])

    with torch.no_grad():
        expected = hf(x, pe_of(0, 11), mask)[0]
        assert_close(mla(x, position_embeddings=pe_of(0, 11), attention_mask=mask)[0][:, 3:], expected[:, 3:])
        caches = DynamicCache(), LatentCache()
        hf_steps = _steps(lambda h, pe, m: hf(h, pe, m, cache=caches[0])[0], x, pe_of, mask, 6)
        mla_steps = _steps(
            lambda h, pe, m: mla(h, position_embeddings=pe, attention_mask=m, cache=caches[1])[0], x, pe_of, mask, 6
        )
    assert_close(mla_steps[:, 3:], hf_steps[:, 3:])
    for a, b in zip(caches[0].layers, caches[1].layers, strict=True):  # same cache layout: latent + rope key
        assert_close(b.keys, a.keys)
        assert_close(b.values, a.values)


VARIANTS = {
    "deepseek": {},
    "gqa-rope-per-kv-head": {"num_kv_heads": 2, "num_rope_heads": 2},
    "partial-rope-pairs": {
        "num_kv_heads": 2,
        "num_rope_heads": 2,
        "rope_interleave": False,
        "rope_pairs": [[0, 3, 5, 6], [1, 2, 4, 7]],
        "rope_table_dim": 16,
    },
    "qwen-like": {
        "num_kv_heads": 2,
        "num_rope_heads": 2,
        "q_bias": True,
        "attention_bias": True,
        "qk_norm": True,
        "latent_norm": False,
    },
    "q-lora-nope-zero": {"q_lora_rank": 10, "qk_nope_head_dim": 0},
    "no-rope": {"num_kv_heads": 2, "num_rope_heads": 2, "qk_rope_head_dim": 0, "qk_norm": True},
}


def _mla(absorb, **kw):
    args = {**DEEPSEEK_SIZES, "v_head_dim": 6, "absorb": absorb, **kw}
    torch.manual_seed(1)
    module = blocks.build("attention", "mla", **args)
    _perturb(module, seed=2)
    return module


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_absorbed_path_equals_expanded_path_outputs_and_gradients(variant):
    expanded, absorbed = _mla("never", **VARIANTS[variant]), _mla("always", **VARIANTS[variant])
    absorbed.load_state_dict(expanded.state_dict())
    x = torch.randn(2, 13, 32)
    mask = _padded_mask(2, 13, 13, [0, 4])
    results = []
    for module in (expanded, absorbed):
        module.zero_grad()
        out = module(x, attention_mask=mask)[0][:, 4:]
        out.pow(2).sum().backward()
        results.append((out, {n: p.grad for n, p in module.named_parameters()}))
    assert_close(results[1][0], results[0][0])
    for name, grad in results[0][1].items():
        assert_close(results[1][1][name], grad, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_cached_absorbed_decoding_equals_uncached_forward(variant):
    module = _mla("auto", **VARIANTS[variant]).eval()
    x = torch.randn(2, 12, 32)
    mask = _padded_mask(2, 12, 12, [0, 5])
    with torch.no_grad():
        full = module(x, attention_mask=mask)[0]
        cache = LatentCache()
        steps = _steps(
            lambda h, pe, m: module(h, attention_mask=m, cache=cache, position_ids=pe)[0],
            x,
            lambda a, b: torch.arange(a, b)[None],
            mask,
            5,
        )
    assert_close(steps[:, 5:], full[:, 5:])
    assert cache.bytes_per_token() == module.cache_elements_per_token() * 4


def test_absorbed_decoding_never_re_expands_past_keys():
    module = _mla("auto").eval()
    seen = []
    module.kv_b_proj.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    cache = LatentCache()
    with torch.no_grad():
        module(torch.randn(1, 9, 32), cache=cache)
        seen.clear()
        module(torch.randn(1, 1, 32), cache=cache)  # a decode step: 9 tokens cached
    assert seen == []  # kv_b_proj's weight is absorbed, the layer is never run over the cache


def test_absorbed_path_uses_kv_b_proj_weights():
    """Non-vacuity of the equality tests: changing the up-projection changes the absorbed output."""
    module = _mla("always")
    x = torch.randn(1, 6, 32)
    before = module(x)[0]
    with torch.no_grad():
        module.kv_b_proj.weight.mul_(1.5)
    assert max_abs_diff(module(x)[0], before) > 1e-3


def test_deepseek_v3_model_with_mla_blocks_gives_the_same_logits_and_generation():
    model = tiny_hf_model("deepseek_v3")
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        gen_expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    for layer in model.model.layers:
        old = layer.self_attn
        new = blocks.build(
            "attention",
            "mla",
            v_head_dim=8,
            q_lora_rank=None,
            rope_interleave=True,
            layer_idx=old.layer_idx,
            **DEEPSEEK_SIZES,
        )
        new.load_state_dict(old.state_dict(), strict=True)
        layer.self_attn = new.eval()
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, expected)
        cache = LatentCache(config=model.config)
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, cache=cache), gen_expected)
    assert cache.bytes_per_token() == 2 * (16 + 8) * 4  # two layers of latent + rope key, float32


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"qk_rope_head_dim": 7}, "even"),
        ({"num_heads": 4, "num_kv_heads": 3}, "divisible"),
        ({"num_rope_heads": 3}, "num_rope_heads"),
        ({"qk_norm": True}, "num_rope_heads == num_kv_heads"),
        ({"rope_table_dim": 16}, "rope_pairs"),
        ({"rope_pairs": [[0, 1]], "rope_table_dim": 16}, "lists of 4"),
        ({"rope_pairs": [[0, 1, 2, 9]], "rope_table_dim": 16}, "beyond"),
        ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ],
)
def test_bad_configs_are_rejected(kw, match):
    args = {**DEEPSEEK_SIZES, "v_head_dim": 8, **kw}
    with pytest.raises(pydantic.ValidationError, match=match):
        blocks.build("attention", "mla", **args)
    with pytest.raises(pydantic.ValidationError, match=match):
        MLAttention(**args)


def test_wrong_position_embeddings_width_is_a_clear_error():
    module = _mla("never", rope_pairs=[[0, 1, 2, 3]], rope_table_dim=16)
    cos = torch.ones(1, 3, 8)
    with pytest.raises(ValueError, match="expects 16"):
        module(torch.randn(1, 3, 32), position_embeddings=(cos, cos))
