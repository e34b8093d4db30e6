"""GQA/MHA -> MLA conversion: exact at full rank, partial RoPE by 2-norm, guided SVD, cache sizes, bad input."""

from __future__ import annotations

import pytest
import torch
from utils import max_abs_diff, tiny_hf_model

from myllm.blocks.attention.mla import MLAttention
from myllm.blocks.cache.latent import LatentCache
from myllm.surgery.attention import read_attention
from myllm.surgery.mla import (
    collect_attention_inputs,
    gqa_to_mla,
    kv_cache_bytes_per_token,
    kv_full_rank,
    select_rope_pairs,
    to_mla,
)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (3, 16), generator=g)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :9] = 0
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


def _convert(model, *, calibrate=False, **kw):
    attn = [layer.self_attn for layer in model.model.layers]
    calib = collect_attention_inputs(model, attn, [dict(zip(("input_ids", "attention_mask"), _batch(1), strict=True))])
    for i, layer in enumerate(model.model.layers):
        layer.self_attn = to_mla(layer.self_attn, calibration=calib[i] if calibrate else None, **kw)
    return model


ARCHS = {
    "llama-gqa": ("llama", {}),
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "qwen2-bias": ("qwen2", {}),
    "qwen3-qk-norm": ("qwen3", {}),
}


@pytest.mark.parametrize("calibrate", [False, True], ids=["weights", "calibrated"])
@pytest.mark.parametrize("arch", ARCHS, ids=list(ARCHS))
def test_full_rank_with_all_rope_dims_keeps_the_logits(arch, calibrate):
    name, overrides = ARCHS[arch]
    ids, mask = _batch()
    reference = _logits(tiny_hf_model(name, **overrides), ids, mask)
    model = tiny_hf_model(name, **overrides)
    spec = read_attention(model.model.layers[0].self_attn)
    _convert(model, calibrate=calibrate, kv_lora_rank=kv_full_rank(spec, spec.head_dim), rope_dims=spec.head_dim)
    assert all(isinstance(layer.self_attn, MLAttention) for layer in model.model.layers)
    layer = model.model.layers[0].self_attn  # the recorded kwargs rebuild the same structure
    rebuilt = MLAttention(**layer.block_kwargs)
    rebuilt.load_state_dict(layer.state_dict(), strict=True)
    assert max_abs_diff(_logits(model, ids, mask), reference) <= 1e-4


@pytest.mark.parametrize("kw", [{"kv_lora_rank": 8, "rope_dims": 8}, {"kv_lora_rank": 24, "rope_dims": 4}])
def test_lower_rank_or_partial_rope_changes_the_logits(kw):
    """Non-vacuity of the test above: the check sees a real compression."""
    ids, mask = _batch()
    reference = _logits(tiny_hf_model("qwen2"), ids, mask)
    assert max_abs_diff(_logits(_convert(tiny_hf_model("qwen2"), **kw), ids, mask), reference) > 1e-3


@pytest.mark.parametrize("rope_dims", [4, 0], ids=["partial-rope", "no-rope"])
def test_cached_decoding_of_a_compressed_model_equals_its_full_forward(rope_dims):
    model = _convert(tiny_hf_model("qwen3"), calibrate=True, kv_lora_rank=10, rope_dims=rope_dims)
    ids, mask = _batch()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        cache = LatentCache(config=model.config)
        steps = [model(input_ids=ids[:, :10], attention_mask=mask[:, :10], cache=cache, use_cache=True).logits]
        for t in range(10, 16):
            step = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
            steps.append(step.logits)
    incremental = torch.cat(steps, 1)
    assert max_abs_diff(incremental[mask.bool()], full[mask.bool()]) <= 1e-4
    expected = sum(kv_cache_bytes_per_token(layer.self_attn) for layer in model.model.layers)
    assert cache.bytes_per_token() == expected == 2 * (10 + 2 * rope_dims + 2) * 4  # latent, 2 rope heads, 2 scales


def test_cache_bytes_before_and_after():
    model = tiny_hf_model("llama", num_key_value_heads=4)
    attn = model.model.layers[0].self_attn
    before = kv_cache_bytes_per_token(attn)
    assert before == 2 * 4 * 8 * 4  # K and V, 4 kv heads of 8 dims, float32
    conversion = gqa_to_mla(attn.state_dict(), read_attention(attn), kv_lora_rank=12, rope_dims=2)
    assert (conversion.kv_bytes_before, conversion.kv_bytes_after) == (before, (12 + 4 * 2) * 4)
    assert kv_cache_bytes_per_token(to_mla(attn, kv_lora_rank=12, rope_dims=2)) == conversion.kv_bytes_after
    assert kv_cache_bytes_per_token(attn, torch.bfloat16) == before // 2


def test_two_norm_selection_keeps_the_loudest_pairs_per_kv_head():
    attn = tiny_hf_model("llama").model.layers[0].self_attn  # 4 heads, 2 kv heads, head_dim 8: pairs (i, i + 4)
    with torch.no_grad():
        attn.k_proj.weight[[1, 5]] *= 20  # kv head 0, pair 1
        attn.k_proj.weight[[8 + 3, 8 + 7]] *= 20  # kv head 1, pair 3
    spec = read_attention(attn)
    assert gqa_to_mla(attn.state_dict(), spec, kv_lora_rank=8, rope_dims=2).rope_pairs == [[1], [3]]
    x = torch.randn(64, 32)
    q = torch.cat([attn.q_proj.weight, torch.zeros(32, 1)], 1).view(4, 8, 33)
    k = torch.cat([attn.k_proj.weight, torch.zeros(16, 1)], 1).view(2, 8, 33)
    calibrated = select_rope_pairs(spec, q, k, 1, calibration=torch.cat([x, torch.ones(64, 1)], 1))
    assert calibrated == [[1], [3]]
    assert select_rope_pairs(spec, q, k, 1, shared=True) in ([[1], [1]], [[3], [3]])


def _kv_error(attn, conversion, x):
    """Relative error of the joint [k_nope; v] outputs of a conversion on inputs ``x``."""
    sd, kw = conversion.state_dict, conversion.block_kwargs
    d, dn, n_kv = 8, kw["qk_nope_head_dim"], kw["num_kv_heads"]
    latent = x @ sd["kv_a_proj_with_mqa.weight"][: kw["kv_lora_rank"]].T
    approx = (latent @ sd["kv_b_proj.weight"].T).view(len(x), n_kv, dn + d)
    keys = (x @ attn.k_proj.weight.T).view(len(x), n_kv, d)
    perms = [[i for i in range(d) if i not in {p, p + d // 2}] for (p,) in conversion.rope_pairs]
    k_nope = torch.stack([keys[:, g, perms[g]] for g in range(n_kv)], 1)
    exact = torch.cat([k_nope, (x @ attn.v_proj.weight.T).view(len(x), n_kv, d)], -1)
    return ((approx - exact).norm() / exact.norm()).item()


def test_calibrated_factorisation_fits_the_calibration_data_better():
    model = tiny_hf_model("llama")
    attn = model.model.layers[0].self_attn
    x = collect_attention_inputs(model, [attn], [{"input_ids": _batch(1)[0]}])[0]
    spec = read_attention(attn)
    kw = {"kv_lora_rank": 6, "rope_dims": 2, "balance_kv": False}
    plain = gqa_to_mla(attn.state_dict(), spec, **kw)
    guided = gqa_to_mla(attn.state_dict(), spec, calibration=x, **kw)
    assert _kv_error(attn, guided, x) < _kv_error(attn, plain, x)


def test_collect_attention_inputs_drops_padding():
    model = tiny_hf_model("llama")
    ids, mask = _batch()
    rows = collect_attention_inputs(
        model, [model.model.layers[1].self_attn], [{"input_ids": ids, "attention_mask": mask}]
    )
    assert rows[0].shape == (int(mask.sum()), 32)


def test_bad_settings_and_unknown_attention_raise_and_change_nothing():
    model = tiny_hf_model("qwen2")
    attn = model.model.layers[0].self_attn
    before = {k: v.clone() for k, v in attn.state_dict().items()}
    spec = read_attention(attn)
    full = kv_full_rank(spec, 2)
    for kw, match in [
        ({"kv_lora_rank": 0, "rope_dims": 2}, "kv_lora_rank must be in"),
        ({"kv_lora_rank": full + 1, "rope_dims": 2}, "full rank"),
        ({"kv_lora_rank": 8, "rope_dims": 3}, "even"),
        ({"kv_lora_rank": 8, "rope_dims": 10}, "head_dim=8"),
        ({"kv_lora_rank": 8, "rope_dims": -2}, "rope_dims"),
        ({"kv_lora_rank": 8, "rope_dims": 2, "calibration": torch.randn(5, 7)}, r"\[N, 32\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            to_mla(attn, **kw)
    for k, v in attn.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(TypeError, match="cannot convert DeepseekV3Attention"):
        to_mla(tiny_hf_model("deepseek_v3").model.layers[0].self_attn, kv_lora_rank=4, rope_dims=2)
    windowed = tiny_hf_model("mistral", sliding_window=8).model.layers[0].self_attn
    with pytest.raises(ValueError, match="sliding-window"):
        to_mla(windowed, kv_lora_rank=4, rope_dims=2)


def test_myllm_gqa_block_converts_exactly_too():
    from myllm import blocks

    block = blocks.build("attention", "sdpa", hidden_size=32, num_heads=4, num_kv_heads=2, qkv_bias=True, qk_norm=True)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    spec = read_attention(block)
    mla = to_mla(block, kv_lora_rank=kv_full_rank(spec, 8), rope_dims=8)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        assert max_abs_diff(mla(x)[0], block(x)[0]) <= 1e-5
