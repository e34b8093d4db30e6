"""Export to native transformers architectures (loadable without myllm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from utils import assert_close, tiny_hf_model, tokens

import myllm  # noqa: F401
from myllm.factory import ExportError, export, replace
from myllm.surgery import add_experts

pytest.importorskip("myllm.blocks.ffn.moe", reason="the moe block comes from the moe branch")


@pytest.mark.parametrize(
    "arch, kwargs, target, cls, dense",
    [
        ("llama", {}, "mixtral", "MixtralForCausalLM", None),
        ("mistral", {}, "mixtral", "MixtralForCausalLM", None),
        ("qwen3", {"layers": [1]}, "qwen3_moe", "Qwen3MoeForCausalLM", [0]),
        ("qwen2", {"n_shared_experts": 1, "shared_gate": True}, "qwen2_moe", "Qwen2MoeForCausalLM", []),
    ],
)
def test_upcycled_models_export_to_native_moe(arch, kwargs, target, cls, dense, tmp_path):
    model = tiny_hf_model(arch)
    replace(model, "attention", "sdpa", layers=[0])
    replace(model, "ffn", "moe", n_experts=4, top_k=2, **kwargs)
    ids = tokens()
    ref = model(ids).logits
    assert export(model, tmp_path / "native") == target
    cfg = json.loads((tmp_path / "native" / "config.json").read_text())
    assert cfg["model_type"] == target and "myllm_surgeries" not in cfg
    assert cfg.get("mlp_only_layers") == dense
    native = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "native")
    assert type(native).__name__ == cls
    assert_close(native(ids).logits, ref, atol=1e-5)


def test_export_loads_in_plain_transformers_without_myllm(tmp_path):
    model = tiny_hf_model("llama")
    replace(model, "ffn", "moe", n_experts=4, top_k=2)
    ids = tokens()
    torch.save({"ids": ids, "logits": model(ids).logits.detach()}, tmp_path / "ref.pt")
    export(model, tmp_path / "native")
    code = (
        "import sys, torch, transformers\n"
        "ref = torch.load(sys.argv[2], weights_only=True)\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "assert 'myllm' not in sys.modules\n"
        "print(type(m).__name__, (m(ref['ids']).logits - ref['logits']).abs().max().item())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "native"), str(tmp_path / "ref.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    name, diff = proc.stdout.split()[-2:]
    assert name == "MixtralForCausalLM" and float(diff) <= 1e-5


def test_model_without_moe_change_exports_to_its_base(tmp_path):
    model = tiny_hf_model("qwen3")
    replace(model, "attention", "eager")
    replace(model, "norm", "rmsnorm")
    assert export(model, tmp_path) == "qwen3"
    assert_close(transformers.AutoModelForCausalLM.from_pretrained(tmp_path)(tokens()).logits, model(tokens()).logits)


@pytest.mark.parametrize(
    "surgery, match",
    [
        (lambda m: replace(m, "norm", "deepnorm"), "DeepNorm"),
        (lambda m: replace(m, "norm", "layernorm", layers=[0]), "LayerNorm"),
        (lambda m: replace(m, "ffn", "moe", n_experts=4, top_k=2, layers=[0]), r"mixtral has no dense layers"),
        (lambda m: replace(m, "ffn", "moe", n_experts=4, top_k=2, temperature=2.0), "temperature"),
        (lambda m: (replace(m, "ffn", "moe", n_experts=4, top_k=2), add_experts(m, 1)), "added expert groups"),
        (
            lambda m: (replace(m, "ffn", "moe", n_experts=4, top_k=2, layers=[0]),
                       replace(m, "ffn", "moe", n_experts=2, top_k=1, layers=[1])),
            "differ between layers",
        ),
        (lambda m: replace(m, "ffn", "coe", n_experts=4, top_k=2), "CoE"),
    ],
)  # fmt: skip
def test_no_native_target_is_a_clear_error(surgery, match, tmp_path):
    model = tiny_hf_model("llama")
    surgery(model)
    with pytest.raises(ExportError, match=match):
        export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
