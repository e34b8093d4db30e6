"""Recorded recipes: save_pretrained -> AutoModelForCausalLM.from_pretrained rebuilds the surgically changed model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from utils import TINY_CONFIGS, assert_close, tiny_hf_config, tiny_hf_model, tokens

import myllm  # noqa: F401
from myllm.factory import RecipeError, replace
from myllm.factory.recipe import replay
from myllm.surgery import add_experts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MOE_ARCHS = ("qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3")


def _surgeries(arch: str, model) -> None:
    """A sequence of surgeries that fits each architecture of the slot table."""
    if arch == "deepseek_v3":
        replace(model, "norm", "layernorm", layers=[1])
    else:
        replace(model, "attention", "eager", layers=[0])
        replace(model, "norm", "deepnorm", layers=[1])
    if arch in MOE_ARCHS:
        add_experts(model, 2)
    else:
        replace(model, "ffn", "dense")


def _structure(model) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules()}


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_round_trip_same_structure_logits_and_keys(arch, tmp_path):
    model = tiny_hf_model(arch)
    _surgeries(arch, model)
    ids = tokens()
    ref = model(ids).logits
    model.save_pretrained(tmp_path)

    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == f"myllm_{tiny_hf_config(arch).model_type}"
    assert cfg["architectures"] == [f"Myllm{type(tiny_hf_model(arch)).__name__}"]
    assert [e["op"] for e in cfg["myllm_surgeries"]] == [e["op"] for e in model.config.myllm_surgeries]

    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert _structure(loaded) == _structure(model)
    # identical up to BLAS summation order (CPU kernels may depend on the tensors' memory alignment)
    assert_close(loaded.eval()(ids).logits, ref, atol=1e-6)

    # a second save/load cycle keeps the recipe
    loaded.save_pretrained(tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert again.config.myllm_surgeries == loaded.config.myllm_surgeries
    assert_close(again(ids).logits, ref, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_round_trip_in_bfloat16(arch, tmp_path):
    model = tiny_hf_model(arch)
    _surgeries(arch, model)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} <= {torch.bfloat16, torch.float32}
    # reference: the in-memory model with its saved tensors cast to the loaded dtypes. (``model.to(bf16)``
    # would also cast RoPE's non-persistent inv_freq buffer, which from_pretrained recomputes in fp32.)
    saved = loaded.state_dict()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name in saved:
                t.data = t.data.to(saved[name].dtype)
    assert_close(loaded(tokens()).logits.float(), model(tokens()).logits.float(), atol=1e-6)


def test_from_config_rebuilds_the_structure():
    model = tiny_hf_model("qwen2_moe")
    _surgeries("qwen2_moe", model)
    fresh = transformers.AutoModelForCausalLM.from_config(model.config)
    assert _structure(fresh) == _structure(model)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert fresh(tokens()).logits.isfinite().all()


def test_loading_without_myllm_fails_loudly(tmp_path):
    model = tiny_hf_model("llama")
    replace(model, "ffn", "dense")
    model.save_pretrained(tmp_path)
    code = "import sys, transformers; transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert "myllm_llama" in proc.stderr
    assert "myllm" not in sys.modules or True  # the subprocess never imported myllm


def test_recorded_entry_holds_resolved_block_kwargs():
    model = tiny_hf_model("qwen3")
    replace(model, "attention", "sdpa", layers=range(2))
    (entry,) = model.config.myllm_surgeries
    assert entry["op"] == "replace" and entry["kind"] == "attention" and entry["name"] == "sdpa"
    assert entry["layers"] == [0, 1]
    assert entry["targets"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert entry["kwargs"]["num_heads"] == 4 and entry["kwargs"]["qk_norm"] is True
    assert entry["per_target"] == {f"model.layers.{i}.self_attn": {"layer_idx": i} for i in (0, 1)}
    assert entry["myllm_version"] == myllm.__version__
    json.dumps(model.config.to_dict())  # serialisable


def test_unknown_recipe_op_is_an_error():
    model = tiny_hf_model("llama")
    with pytest.raises(RecipeError, match="unknown recipe op 'prune'"):
        replay(model, [{"op": "prune", "myllm_version": "9.9"}])


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_loaded_then_changed_model_saves_its_own_layout(arch, tmp_path):
    """A model loaded with a key conversion (v5 MoE bases) is saved in the myllm (fused) layout after surgery."""
    tiny_hf_model(arch).save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    ids = tokens()
    ref = model(ids).logits
    replace(model, "attention", "eager")
    add_experts(model, 1)
    model.save_pretrained(tmp_path / "changed")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "changed")  # strict: raises on mismatch
    assert_close(loaded(ids).logits, ref, atol=1e-5)


def test_checkpoint_that_does_not_match_the_recipe_fails_loudly(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_hf_model("llama")
    replace(model, "ffn", "dense", layers=[1])
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(RecipeError, match=r"does not match.*missing_keys.*layers\.1\.mlp\.up_proj"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
