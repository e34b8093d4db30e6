"""``myllm eval ppl``: results equal the Python API, several models, JSON and plot outputs, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from utils import tiny_myllm

from myllm.cli import main
from myllm.data.tokenizer import train_tokenizer
from myllm.eval import JsonlTexts, perplexity

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, lm_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("other") / "other"
    tiny_myllm(seed=5, vocab_size=len(lm_tokenizer), max_position_embeddings=128).save_pretrained(out)
    lm_tokenizer.save_pretrained(out)
    return out


def test_ppl_of_two_models_equals_the_api(
    tmp_path, capsys, lm_model, lm_tokenizer, lm_model_dir, other_model_dir, lm_heldout
):
    out = tmp_path / "res" / "ppl.json"
    rc = main(
        [
            "eval",
            "ppl",
            str(lm_model_dir),
            str(other_model_dir),
            str(lm_heldout),
            "--max-length",
            "32",
            "--stride",
            "16",
            "-o",
            str(out),
            "--plot",
            str(tmp_path / "ppl.png"),
            "--no-progress",
        ]
    )
    assert rc == 0
    results = json.loads(out.read_text())
    assert list(results) == ["tiny", "other"]
    expected = perplexity(lm_model, lm_tokenizer, JsonlTexts(lm_heldout), max_length=32, stride=16)
    for key in ("tokens", "bytes", "documents", "skipped_documents", "windows"):
        assert results["tiny"][key] == expected[key]
    assert math.isclose(results["tiny"]["ppl"], expected["ppl"], rel_tol=1e-6)
    assert results["tiny"]["skipped_documents"] == 1  # the empty document
    assert results["other"]["ppl"] != results["tiny"]["ppl"]
    assert (tmp_path / "ppl.png").read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "bits/byte" in table and "other" in table


def test_cli_subprocess_prints_json(tmp_path, lm_model_dir, lm_heldout):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "myllm",
            "eval",
            "ppl",
            str(lm_model_dir),
            str(lm_heldout),
            "--limit",
            "3",
            "--max-length",
            "64",
            "--no-progress",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout[proc.stdout.index("{") :])["tiny"]
    assert result["documents"] == 3 and result["ppl"] > 1


def bad(tmp_path, capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_input_is_refused_and_writes_nothing(tmp_path, capsys, lm_model_dir, lm_heldout):
    out = tmp_path / "res.json"
    data = str(lm_heldout)
    not_model = tmp_path / "notmodel"
    not_model.mkdir()
    assert "no config.json" in bad(tmp_path, capsys, ["eval", "ppl", str(not_model), data, "-o", str(out)])
    assert "missing" in bad(tmp_path, capsys, ["eval", "ppl", str(tmp_path / "nope"), data])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "no documents" in bad(tmp_path, capsys, ["eval", "ppl", str(lm_model_dir), str(empty), "-o", str(out)])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    assert "broken.jsonl:2: invalid JSON" in bad(tmp_path, capsys, ["eval", "ppl", str(lm_model_dir), str(broken)])
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    err = bad(tmp_path, capsys, ["eval", "ppl", str(lm_model_dir), data, "-o", str(blocker / "res.json")])
    assert "existing file" in err
    assert "at least one MODEL" in bad(tmp_path, capsys, ["eval", "ppl", data])
    assert not out.exists()


def test_tokenizer_model_mismatch(tmp_path, capsys, lm_texts, lm_model_dir, lm_heldout):
    big = train_tokenizer(lm_texts, tmp_path / "big", vocab_size=400)
    assert len(big) > 320
    err = bad(
        tmp_path, capsys, ["eval", "ppl", str(lm_model_dir), str(lm_heldout), "--tokenizer", str(tmp_path / "big")]
    )
    assert "differs from the one saved with the model" in err
    bare = tmp_path / "bare"
    shutil.copytree(lm_model_dir, bare, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*", "special*"))
    assert "holds no tokenizer" in bad(tmp_path, capsys, ["eval", "ppl", str(bare), str(lm_heldout)])
    err = bad(tmp_path, capsys, ["eval", "ppl", str(bare), str(lm_heldout), "--tokenizer", str(tmp_path / "big")])
    assert "does not match the model" in err


def test_checkpoint_with_missing_weights_is_refused(tmp_path, capsys, lm_model_dir, lm_heldout):
    import safetensors.torch as st

    broken = tmp_path / "broken"
    shutil.copytree(lm_model_dir, broken)
    sd = st.load_file(broken / "model.safetensors")
    sd.pop(next(k for k in sd if "mlp" in k))
    st.save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
    err = bad(tmp_path, capsys, ["eval", "ppl", str(broken), str(lm_heldout)])
    assert "does not fill the model" in err and "missing keys" in err
