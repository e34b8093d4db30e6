"""Sliding-window attention in MyLLM (``sliding_window`` + transformers' ``layer_types``): parity with HF
Mistral / Qwen2 (in test_hf_parity.py) and with the MoE architectures here, bounded caches, exports, and clear
refusals (bad settings, blocks that cannot take a window mask, targets that cannot express the layout)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from utils import hf_parity, left_pad_positions, max_abs_diff, tiny_hf_model, tiny_myllm

from myllm import MyLLMConfig, MyLLMForCausalLM, factory

TOL = 1e-5
MOE_WINDOWS = {
    "qwen2_moe": {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
    "qwen3_moe": {"use_sliding_window": True, "sliding_window": 3},
    "mixtral": {"sliding_window": 3},
}


def _full_attention_twin(ours: MyLLMForCausalLM) -> MyLLMForCausalLM:
    """The same weights with every layer on full attention."""
    config = MyLLMConfig(**{**ours.config.to_dict(), "sliding_window": None, "layer_types": None})
    twin = MyLLMForCausalLM(config).eval()
    twin.load_state_dict(ours.state_dict())
    return twin


@pytest.mark.parametrize("arch", sorted(MOE_WINDOWS))
def test_moe_models_with_windows_match_hf_and_export_back(arch):
    hf = tiny_hf_model(arch, **MOE_WINDOWS[arch])
    ours = MyLLMForCausalLM.from_hf(hf)
    assert ours.config.has_sliding_layers
    diffs = hf_parity(hf, ours)
    assert max(diffs.values()) <= TOL, diffs
    # non-vacuity: at 8 tokens a window of 3 changes the logits, so the parity above saw the windows
    assert hf_parity(hf, _full_attention_twin(ours))["full"] > 1e-3
    back = ours.to_hf()
    x = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        assert torch.equal(back(x).logits, hf(x).logits)
    assert back.config.sliding_window == 3


def test_sliding_layers_keep_a_bounded_cache_and_full_layers_everything():
    hf = tiny_hf_model("qwen2_swa")  # layer 0 full, layer 1 sliding (window 3)
    ours = MyLLMForCausalLM.from_hf(hf)
    assert ours.config.layer_types == ["full_attention", "sliding_attention"]
    x = torch.randint(0, 128, (1, 4))
    out = ours.generate(x, max_new_tokens=12, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(out.sequences, hf.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=0))
    full, sliding = out.cache.layers
    assert full.keys.shape[-2] == 15  # every token but the last generated one
    assert sliding.keys.shape[-2] <= 3  # the window, not the sequence


@settings(max_examples=15, deadline=None)
@given(
    window=st.integers(1, 6),
    length=st.integers(1, 12),
    pad=st.integers(0, 3),
    impl=st.sampled_from(["eager", "sdpa"]),
)
def test_window_parity_for_any_window_length_and_left_padding(window, length, pad, impl):
    hf = tiny_hf_model("mistral_swa", sliding_window=window, attn_implementation=impl)
    ours = MyLLMForCausalLM.from_hf(hf)
    x = torch.randint(0, 128, (2, length + pad), generator=torch.Generator().manual_seed(window * 100 + length))
    mask = torch.ones_like(x)
    mask[1, :pad] = 0
    pos = left_pad_positions(mask)
    with torch.no_grad():
        a = ours(x, attention_mask=mask, position_ids=pos).logits
        b = hf(x, attention_mask=mask, position_ids=pos).logits
    assert max_abs_diff(a[mask.bool()], b[mask.bool()]) <= TOL


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sliding_window": 0}, "sliding_window must be a positive integer"),
        ({"sliding_window": True}, "sliding_window must be a positive integer"),
        ({"sliding_window": 4, "layer_types": ["sliding_attention"]}, "layer_types has 1 entries"),
        ({"sliding_window": 4, "layer_types": ["sliding_attention", "local"]}, r"unknown type\(s\) \['local'\]"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding_window is not set"),
        (
            {"sliding_window": 4, "attention": {"name": "moba", "chunk_size": 4, "top_k": 2}},
            "layer 0 is a sliding_attention layer, but attention block 'moba'",
        ),
    ],
)
def test_bad_window_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_myllm(num_hidden_layers=2, **kwargs)


def test_moba_on_full_layers_of_a_windowed_model_is_fine():
    model = tiny_myllm(
        num_hidden_layers=2,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        layer_overrides={"1": {"attention": {"name": "moba", "chunk_size": 4, "top_k": 2}}},
    )
    assert model(torch.randint(0, 64, (1, 9))).logits.isfinite().all()


def test_factory_refuses_moba_on_sliding_layers_and_leaves_the_model_unchanged():
    hf = tiny_hf_model("qwen2_swa")
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    kinds = [type(layer.self_attn) for layer in hf.model.layers]
    with pytest.raises(Exception, match=r"sliding window \(3\), which moba cannot"):
        factory.replace(hf, "attention", "moba", chunk_size=2, top_k=2)
    assert [type(layer.self_attn) for layer in hf.model.layers] == kinds
    assert all(torch.equal(v, before[k]) for k, v in hf.state_dict().items())
    factory.replace(hf, "attention", "moba", chunk_size=2, top_k=2, layers=[0])  # the full layer converts
    assert type(hf.model.layers[0].self_attn).__name__ == "MobaAttention"
    ours = tiny_myllm(num_hidden_layers=2, sliding_window=4)  # the same refusal for MyLLM's own layers
    with pytest.raises(ValueError, match="layer 0 is a sliding_attention layer"):
        factory.replace(ours, "attention", "moba", chunk_size=2, top_k=2)
    assert ours.config.attention["name"] == "sdpa" and type(ours.model.layers[0].self_attn).__name__ == "SdpaAttention"


def test_exports_refuse_window_layouts_the_target_cannot_express():
    mixed = MyLLMForCausalLM.from_hf(tiny_hf_model("qwen2_swa"))
    with pytest.raises(ValueError, match="cannot export to mistral: layer_types"):
        mixed.to_hf("mistral")  # Mistral slides in every layer or none
    with pytest.raises(ValueError, match="cannot export to llama: layer_types"):
        MyLLMForCausalLM.from_hf(tiny_hf_model("mistral_swa")).to_hf("llama")
    back = mixed.to_hf("qwen2")  # Qwen2 keeps per-layer types
    assert back.config.layer_types == ["full_attention", "sliding_attention"]
