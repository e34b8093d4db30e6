"""``factory.replace(model, "attention", "moba" | "mla", ...)``: conversion in real models, recipe, reload, errors."""

from __future__ import annotations

import pytest
import torch
import transformers
from utils import assert_unchanged, max_abs_diff, model_snapshot, tiny_hf_model, tiny_myllm, tokens

import myllm  # noqa: F401
from myllm import MyLLMForCausalLM
from myllm.blocks.attention.mla import MLAttention
from myllm.blocks.attention.moba import MobaAttention
from myllm.factory import MoveError, replace
from myllm.surgery.attention import read_attention
from myllm.surgery.mla import collect_attention_inputs, kv_full_rank


def _inputs():
    ids = tokens(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_replace_with_mla_at_full_rank_keeps_the_logits_and_reloads(arch, tmp_path):
    ids, mask = _inputs()
    expected = _logits(tiny_hf_model(arch), ids, mask)
    model = tiny_hf_model(arch)
    spec = read_attention(model.model.layers[0].self_attn)
    replace(model, "attention", "mla", kv_lora_rank=kv_full_rank(spec, spec.head_dim), rope_dims=spec.head_dim)
    assert all(isinstance(layer.self_attn, MLAttention) for layer in model.model.layers)
    assert max_abs_diff(_logits(model, ids, mask), expected) <= 1e-4
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert max_abs_diff(_logits(reloaded, ids, mask), _logits(model, ids, mask)) == 0.0


def test_replace_with_compressed_calibrated_mla_in_some_layers():
    model = tiny_hf_model("llama")
    ids, mask = _inputs()
    attn = [layer.self_attn for layer in model.model.layers]
    calibration = dict(enumerate(collect_attention_inputs(model, attn, [{"input_ids": ids, "attention_mask": mask}])))
    expected = _logits(tiny_hf_model("llama"), ids, mask)
    replace(model, "attention", "mla", layers=[0], kv_lora_rank=6, rope_dims=4, calibration=calibration)
    assert isinstance(model.model.layers[0].self_attn, MLAttention)
    assert type(model.model.layers[1].self_attn).__name__ == "LlamaAttention"
    entry = model.config.myllm_surgeries[-1]
    assert entry["options"] == {"rope_dims": 4, "calibration": "<dict>"}  # tensors are not written to config.json
    assert entry["kwargs"]["kv_lora_rank"] == 6 and "rope_pairs" in entry["kwargs"]
    assert max_abs_diff(_logits(model, ids, mask), expected) > 1e-4  # compressed: not the same function


def test_replace_with_moba_keeps_the_weights_and_reloads(tmp_path):
    ids, mask = _inputs()
    expected = _logits(tiny_hf_model("qwen2"), ids, mask)
    covering = tiny_hf_model("qwen2")
    replace(covering, "attention", "moba", chunk_size=3, top_k=4)
    assert all(isinstance(layer.self_attn, MobaAttention) for layer in covering.model.layers)
    assert max_abs_diff(_logits(covering, ids, mask), expected) <= 1e-5
    sparse = tiny_hf_model("qwen2")
    replace(sparse, "attention", "moba", chunk_size=2, top_k=2, layers=range(0, 1))  # last layer stays dense
    assert type(sparse.model.layers[1].self_attn).__name__ == "Qwen2Attention"
    assert max_abs_diff(_logits(sparse, ids, mask), expected) > 1e-4
    sparse.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.model.layers[0].self_attn.chunk_size == 2
    assert max_abs_diff(_logits(reloaded, ids, mask), _logits(sparse, ids, mask)) == 0.0


def test_replace_on_a_myllm_model_rewrites_its_attention_specs(tmp_path):
    model = tiny_myllm()
    ids, mask = _inputs()
    expected = _logits(model, ids, mask)
    replace(model, "attention", "mla", kv_lora_rank=16, rope_dims=8)
    assert model.config.block_spec("attention", 0)["name"] == "mla"
    assert max_abs_diff(_logits(model, ids, mask), expected) <= 1e-4
    model.save_pretrained(tmp_path)
    reloaded = MyLLMForCausalLM.from_pretrained(tmp_path).eval()
    assert max_abs_diff(_logits(reloaded, ids, mask), _logits(model, ids, mask)) == 0.0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rope_dims": 4}, MoveError, "needs kv_lora_rank"),
        ({"kv_lora_rank": 0, "rope_dims": 4}, MoveError, "kv_lora_rank must be in"),
        ({"kv_lora_rank": 999, "rope_dims": 4}, MoveError, "full rank"),
        ({"kv_lora_rank": 8, "rope_dims": 3}, MoveError, "even"),
        ({"kv_lora_rank": 8, "rope_dims": 4, "calibration": {5: torch.zeros(2, 32)}}, MoveError, "layer 0"),
        ({"kv_lora_rank": 8, "rope_dims": 4, "qk_rope_head_dim": 2}, MoveError, "qk_rope_head_dim=2 does not fit"),
        ({"kv_lora_rank": 8, "q_lora_rank": 4}, MoveError, "q_lora_rank=4 does not fit"),
        ({"kv_lora_rank": 8, "absorb": "sometimes"}, ValueError, "absorb"),  # a bad block keyword
    ],
)
def test_bad_mla_settings_leave_the_model_unchanged(kwargs, error, match):
    model = tiny_hf_model("qwen3")
    snap = model_snapshot(model)
    with pytest.raises(error, match=match):
        replace(model, "attention", "mla", **kwargs)
    assert_unchanged(model, snap)


def test_moba_options_and_unknown_attention_are_refused():
    model = tiny_hf_model("llama")
    snap = model_snapshot(model)
    with pytest.raises(MoveError, match="does not take rope_dims"):
        replace(model, "attention", "moba", chunk_size=4, top_k=2, rope_dims=4)
    assert_unchanged(model, snap)
    deepseek = tiny_hf_model("deepseek_v3")
    with pytest.raises(MoveError, match="expected an attention module with nn.Linear q_proj"):
        replace(deepseek, "attention", "mla", kv_lora_rank=8, rope_dims=4)
