"""examples/attention_quality.py --quick: the quality table is produced, with honest sanity checks."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("attention_quality")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "attention_quality.py"), "--quick", "--out", str(out)],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "attention_quality.json").read_text()), (out / "attention_quality.md").read_text()


def test_every_perplexity_is_finite_and_every_variant_is_reported(report):
    data, table = report
    assert math.isfinite(data["dense"]["ppl"]) and math.isfinite(data["dense_healed"]["ppl"])
    groups = {r["group"] for r in data["rows"]}
    assert groups == {"main", "lever", "sanity"}
    for row in data["rows"]:
        assert math.isfinite(row["ppl"]) and row["ppl"] > 1
        if row["group"] != "sanity":
            assert math.isfinite(row["ppl_healed"]) and row["ppl_healed"] > 1
            assert len(row["heal_losses"]) == row["heal_steps"]
        assert f"| {row['name']} |" in table
    assert "| variant |" in table and "Targets (issue 5)" in table
    assert len(data["targets"]) == 5 and all(t["verdict"] in ("met", "NOT met") for t in data["targets"])


def test_full_rank_mla_equals_the_dense_model(report):
    data, _ = report
    (sanity,) = [r for r in data["rows"] if r["group"] == "sanity"]
    assert sanity["kv_bytes_after"] == sanity["kv_bytes_before"]
    assert abs(sanity["ratio"] - 1) <= 1e-4
    # non-vacuity: the compressed conversions do change the model
    assert any(abs(r["ratio"] - 1) > 1e-6 for r in data["rows"] if r["group"] == "main" and r["block"] == "mla")


def test_cache_sizes_and_sparsity_match_the_requested_factors(report):
    data, _ = report
    s = data["sizes"]
    factors = 0
    for row in data["rows"]:
        tag = re.fullmatch(r"(\d+)x", row["name"].split()[1])
        factor = int(tag.group(1)) if tag else None
        factors += factor is not None
        if row["block"] == "mla":
            if factor is not None:
                assert row["kv_bytes_before"] == factor * row["kv_bytes_after"]
            rope = row["kwargs"]["rope_dims"]
            assert row["kv_bytes_after"] == s["num_hidden_layers"] * 4 * (
                row["kwargs"]["kv_lora_rank"] + s["num_key_value_heads"] * rope
            )
        else:
            assert row["kv_bytes_after"] == row["kv_bytes_before"]
            assert factor * row["kwargs"]["top_k"] * row["kwargs"]["chunk_size"] == s["seq_len"]
    assert factors == len(data["rows"]) - 2  # all but the full-rank and the partial-RoPE-only MLA rows


def test_pretraining_curve_and_healing_are_recorded(report):
    data, _ = report
    s = data["sizes"]
    assert data["pretrain"]["heldout"][-1]["step"] == s["steps"]
    assert data["pretrain"]["heldout"][-1]["ppl"] == pytest.approx(data["dense"]["ppl"], rel=1e-5)
    assert data["eval"]["tokens"] == data["eval"]["windows"] * (s["seq_len"] - 1)
