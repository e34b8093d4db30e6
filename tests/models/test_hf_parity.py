"""Parity with real Hugging Face models: ``MyLLMForCausalLM.from_hf`` of Llama, Mistral, Qwen2 (q/k/v bias) and
Qwen3 (q/k norm), and Mistral / Qwen2 with sliding-window layers, gives the HF logits (max abs diff <= 1e-5, float32) and greedy continuations, in eager and sdpa,
without and with a cache, with left padding; each check is paired with a perturbed weight it must detect.
``to_hf`` exports back exactly, and refuses what the target cannot express."""

from __future__ import annotations

import copy

import pytest
import torch
from utils import hf_parity as _parity
from utils import parity_inputs as _inputs
from utils import tiny_hf_model, tiny_myllm

from myllm import MyLLMForCausalLM
from myllm.models.convert import HF_CONVERTERS, HFConverter, register_hf_converter

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "mistral_swa", "qwen2_swa"]  # *_swa: window 3 < 8 tokens
# a weight whose change the parity checks must see, chosen where each architecture differs
PERTURB = {
    "llama": "model.layers.1.post_attention_layernorm.weight",
    "mistral": "model.layers.0.mlp.up_proj.weight",
    "qwen2": "model.layers.1.self_attn.k_proj.bias",
    "qwen3": "model.layers.1.self_attn.k_norm.weight",
    "mistral_swa": "model.layers.1.self_attn.v_proj.weight",
    "qwen2_swa": "model.layers.1.self_attn.q_proj.bias",
}
TOL = 1e-5


@pytest.fixture(params=[(a, i) for a in ARCHS for i in ("eager", "sdpa")], ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request):
    arch, impl = request.param
    hf = tiny_hf_model(arch, attn_implementation=impl)
    return arch, impl, hf, MyLLMForCausalLM.from_hf(hf)


def test_imported_model_matches_hf_logits(pair):
    arch, impl, hf, ours = pair
    assert ours.config._attn_implementation == impl and ours.config.source_model_type == arch.removesuffix("_swa")
    assert ours.model.layers[0].self_attn.mask_implementation == impl or impl == "sdpa"
    diffs = _parity(hf, ours)
    assert max(diffs.values()) <= TOL, diffs


def test_imported_model_parity_detects_a_perturbed_weight(pair):
    arch, impl, hf, ours = pair
    with torch.no_grad():
        ours.get_parameter(PERTURB[arch]).view(-1)[1] += 0.05
    diffs = _parity(hf, ours)
    assert min(diffs.values()) > TOL, diffs


def test_imported_model_gives_the_same_greedy_continuation(pair):
    arch, impl, hf, ours = pair
    x, mask = _inputs()
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = hf.generate(x, **kw)
    assert torch.equal(ours.generate(x, **kw), expected)
    assert torch.equal(ours.generate(x, cache_implementation="static", **kw), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_to_hf_exports_back_exactly(arch):
    hf = tiny_hf_model(arch, tie_word_embeddings=arch == "qwen2")
    ours = MyLLMForCausalLM.from_hf(hf)
    back = ours.to_hf()
    assert type(back) is type(hf)
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    sd, ref = back.state_dict(), hf.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    x, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(back(x).logits, hf(x).logits)


def test_to_hf_keeps_swapped_kernels_and_refuses_structural_changes():
    hf = tiny_hf_model("qwen2")
    ours = MyLLMForCausalLM.from_hf(hf)
    ours.set_attn_implementation("eager")  # a kernel change: still exactly a Qwen2
    assert ours.to_hf().config._attn_implementation == "eager"

    changed = MyLLMForCausalLM.from_hf(hf)
    changed.config.layer_overrides = {"1": {"ffn": {"name": "dense", "gated": False}}}
    with pytest.raises(ValueError, match=r"cannot export to qwen2: layer 1 ffn is .*gated.*False"):
        changed.to_hf()
    with pytest.raises(ValueError, match=r"cannot export to llama: layer 0 attention"):
        MyLLMForCausalLM.from_hf(tiny_hf_model("qwen3")).to_hf("llama")  # q/k norm cannot be expressed
    deep = tiny_myllm(norm="deepnorm", source_model_type="llama")
    with pytest.raises(ValueError, match="cannot export to llama: model norm"):
        deep.to_hf()
    with pytest.raises(ValueError, match="to_hf needs a model_type"):
        tiny_myllm().to_hf()


def test_import_errors_are_clear():
    unknown = tiny_hf_model("llama")
    unknown.config.model_type = "not_a_known_arch"  # (qwen2_moe, the example here before, is now supported)
    with pytest.raises(ValueError, match=r"no MyLLM converter for model_type 'not_a_known_arch'; supported: .*llama"):
        MyLLMForCausalLM.from_hf(unknown)
    with pytest.raises(ValueError, match="already registered"):
        register_hf_converter("llama", HF_CONVERTERS["llama"])


def test_the_converter_table_can_be_extended():
    """Another module adds an architecture by registering a converter (here: llama under another name)."""
    base = HF_CONVERTERS["llama"]
    register_hf_converter("test_llama_alias", copy.copy(base))
    try:
        hf = tiny_hf_model("llama")
        hf.config.model_type = "test_llama_alias"
        ours = MyLLMForCausalLM.from_hf(hf)
        assert ours.config.source_model_type == "test_llama_alias"
        assert isinstance(HF_CONVERTERS["test_llama_alias"], HFConverter)
        assert type(ours.to_hf()).__name__ == "LlamaForCausalLM"
    finally:
        HF_CONVERTERS.pop("test_llama_alias")
