"""``myllm surgery`` end to end in a subprocess (imports this checkout's myllm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import transformers
from utils import assert_close, tiny_hf_model, tokens

import myllm  # noqa: F401
from myllm.cli import main
from myllm.commands.surgery import parse_layers, parse_sets

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, "-m", "myllm", "surgery", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def test_cli_replace_then_add_experts(tmp_path):
    model = tiny_hf_model("qwen2_moe")
    ids = tokens()
    ref = model(ids).logits
    src, mid, out = tmp_path / "src", tmp_path / "mid", tmp_path / "out"
    model.save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")

    proc = _cli("replace", src, mid, "attention", "eager", "--layers", "0-1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "wrote MyllmQwen2MoeForCausalLM" in proc.stdout
    assert main(["surgery", "add-experts", str(mid), str(out), "2", "--top-k-new", "1"]) == 0  # in-process

    assert (out / "tokenizer_config.json").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert [e["op"] for e in cfg["myllm_surgeries"]] == ["replace", "add_experts"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert_close(loaded(ids).logits, ref, atol=1e-5)


def test_cli_errors_are_one_line(tmp_path, capsys):
    model = tiny_hf_model("llama")
    model.save_pretrained(tmp_path / "src")
    args = ["surgery", "replace", str(tmp_path / "src"), str(tmp_path / "out"), "ffn", "dense"]
    assert main([*args, "--set", "intermediate_size=48"]) == 2
    assert "myllm surgery: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["surgery", "replace", str(tmp_path / "src"), str(tmp_path / "src"), "norm", "rmsnorm"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["surgery", "export", str(tmp_path / "src"), str(tmp_path / "native")]) == 0  # no change: llama
    assert "as llama" in capsys.readouterr().out
    assert main(["surgery", "replace", str(tmp_path / "src"), str(tmp_path / "dn"), "norm", "deepnorm"]) == 0
    assert main(["surgery", "export", str(tmp_path / "dn"), str(tmp_path / "native2")]) == 2
    assert "DeepNorm" in capsys.readouterr().err and not (tmp_path / "native2").exists()


def test_parsers():
    assert parse_layers("0,2,5-7") == [0, 2, 5, 6, 7]
    assert parse_layers("-1") == [-1]
    assert parse_layers(None) is None
    assert parse_sets(["n_experts=8", "init=copy", 'balance={"switch": 0.01}', "x=1e-3"]) == {
        "n_experts": 8, "init": "copy", "balance": {"switch": 0.01}, "x": 1e-3,
    }  # fmt: skip
