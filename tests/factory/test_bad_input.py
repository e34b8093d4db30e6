"""Bad input: a clear error, raised before anything changed."""

from __future__ import annotations

import pydantic
import pytest
import torch
import transformers
from torch import nn
from utils import assert_unchanged, model_snapshot, tiny_hf_config, tiny_hf_model

import myllm  # noqa: F401
from myllm.blocks import RegistryError
from myllm.factory import LayoutError, SurgeryError, replace
from myllm.surgery import add_experts

CASES = {
    "unknown kind": (lambda m: replace(m, "mlp", "dense"), LayoutError, "valid kinds: attention, ffn, norm"),
    "unknown block": (lambda m: replace(m, "ffn", "swigloo"), RegistryError, "available ffn blocks: .*dense"),
    "bad keyword": (lambda m: replace(m, "norm", "rmsnorm", epsilon=1e-3), pydantic.ValidationError, "epsilon"),
    "layer out of range": (lambda m: replace(m, "attention", "eager", layers=[0, 2]), LayoutError, "out of range"),
    "heads do not divide": (
        lambda m: replace(m, "attention", "sdpa", num_kv_heads=3),
        pydantic.ValidationError,
        r"num_heads \(4\) must be divisible by num_kv_heads \(3\)",
    ),
    "hidden not divisible": (
        lambda m: replace(m, "attention", "sdpa", num_heads=5, num_kv_heads=5, head_dim=None),
        pydantic.ValidationError,
        "not divisible by num_heads",
    ),
    "layers and targets": (
        lambda m: replace(m, "ffn", "dense", layers=[0], targets=r"model\.layers\.0\.mlp"),
        LayoutError,
        "either layers= or targets=",
    ),
    "weights do not fit": (
        lambda m: replace(m, "ffn", "dense", intermediate_size=48),
        ValueError,
        "do not fit ffn/dense",
    ),
    "add_experts on a dense model": (lambda m: add_experts(m, 2), LayoutError, "no MoE layer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_error_and_changes_nothing(case):
    fn, exc, match = CASES[case]
    model = tiny_hf_model("llama")
    snap = model_snapshot(model)
    with pytest.raises(exc, match=match):
        fn(model)
    assert_unchanged(model, snap)


def test_unsupported_model_names_supported_types():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128))
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LayoutError, match=r"Supported model types: .*llama.*targets="):
        replace(model, "ffn", "dense")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snap.items())


def test_meta_device_model_is_refused():
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(tiny_hf_config("llama"))
    with pytest.raises(SurgeryError, match="meta device"):
        replace(model, "attention", "eager")
    assert not hasattr(model.config, "myllm_surgeries")


def test_zero3_partitioned_model_is_refused():
    model = tiny_hf_model("llama")
    # what deepspeed.zero.Init leaves on every parameter (ds_id, ds_status, ds_shape ...)
    model.model.layers[1].mlp.up_proj.weight.ds_id = 7
    snap = model_snapshot(model)
    with pytest.raises(SurgeryError, match="ZeRO-3"):
        replace(model, "ffn", "dense")
    assert_unchanged(model, snap)


def test_add_experts_refuses_zero3_and_wrappers():
    model = tiny_hf_model("mixtral")
    model.model.layers[0].mlp.experts.gate_up_proj.ds_status = "NOT_AVAILABLE"
    snap = model_snapshot(model)
    with pytest.raises(SurgeryError, match="ZeRO-3"):
        add_experts(model, 1)
    assert_unchanged(model, snap)

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(SurgeryError, match="training wrapper"):
        replace(Wrapper(tiny_hf_model("llama")), "ffn", "dense")


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"n_new": 0}, ValueError, "positive int"),
        ({"n_new": 2, "top_k_new": 3}, ValueError, r"top_k_new must be in \[1, n_new=2\]"),
        ({"n_new": 2, "init": "mean"}, ValueError, "unknown init 'mean'"),
        ({"n_new": 2, "layers": [0]}, LayoutError, "add experts to every MoE layer"),
    ],
)
def test_add_experts_bad_arguments(kwargs, exc, match):
    model = tiny_hf_model("qwen2_moe")
    snap = model_snapshot(model)
    with pytest.raises(exc, match=match):
        add_experts(model, **kwargs)
    assert_unchanged(model, snap)


def test_add_experts_on_a_dense_layer_of_an_moe_model():
    model = tiny_hf_model("deepseek_v3")  # layer 0 is dense (first_k_dense_replace=1)
    snap = model_snapshot(model)
    with pytest.raises(LayoutError, match=r"dense layer: model\.layers\.0\.mlp \(DeepseekV3MLP\)"):
        add_experts(model, 2, layers=[0, 1])
    assert_unchanged(model, snap)


def test_caller_kwargs_override_sizes_from_the_model():
    model = tiny_hf_model("llama")
    replace(model, "norm", "rmsnorm", eps=1e-3, layers=[0])
    assert model.model.layers[0].input_layernorm.variance_epsilon == 1e-3
    assert model.config.myllm_surgeries[0]["kwargs"]["eps"] == 1e-3
