"""``myllm demo --quick`` runs as a subprocess on this checkout; its report's numbers are checked for sanity,
each function-preserving check next to its control showing that a real change is seen."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCH_EXTENSIONS_DIR": str(cwd / "ext")}
    return subprocess.run(
        [sys.executable, "-m", "myllm", "demo", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("demo")
    proc = _run_cli(["--quick", "--no-progress"], cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cwd / "runs" / "demo", proc


@pytest.mark.slow
def test_quick_demo_writes_a_complete_report(quick_run):
    out, proc = quick_run
    res = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert not [p for p in out.parent.iterdir() if p.name != "demo"], "staging directory left behind"

    # data and models
    assert res["corpus"]["train_docs"] > 0 and res["corpus"]["heldout_docs"] > 0
    assert res["shards"]["tokens"] > 0 and res["tokenizer"]["vocab_size"] <= res["preset"]["vocab_size"]
    dense, moe = res["params"]["dense"], res["params"]["moe"]
    assert dense["total"] == dense["active"]
    assert moe["total"] > moe["active"] > dense["total"]

    # upcycling keeps the logits; the control (random experts) shows the check sees a change
    up = res["upcycle"]
    assert up["max_logit_diff"] <= 1e-4
    assert up["control_random_init_diff"] > 1e-2
    assert f"{up['max_logit_diff']:.2e}" in report and f"{up['max_logit_diff']:.2e}" in proc.stdout

    # the reloaded MoE is the in-memory one; the control (the dense model) differs
    rl = res["reload"]
    assert rl["max_logit_diff"] <= 1e-6
    assert rl["control_dense_diff"] > 1e-3

    # training lowers the loss and the held-out perplexity
    pre = res["loss"]["pretrain"]
    assert pre["steps"] == res["preset"]["pretrain_steps"] and pre["last_mean"] < pre["first"]
    assert res["loss"]["dense"]["steps"] == res["loss"]["moe"]["steps"] == res["preset"]["continue_steps"]
    ppl = res["ppl"]
    for label in ("untrained", "dense pretrained", "dense continued", "MoE continued"):
        assert math.isfinite(ppl[label]["ppl"]) and math.isfinite(ppl[label]["bits_per_byte"])
        assert f"{ppl[label]['ppl']:.2f}" in report
    for label in ("dense pretrained", "dense continued", "MoE continued"):
        assert ppl[label]["ppl"] < ppl["untrained"]["ppl"]
    assert len({ppl[k]["tokens"] for k in ppl}) == 1  # every model scored on the same tokens

    # expert load: every MoE layer routed top_k tokens per token to some of its experts
    loads = res["expert_load_training"]
    assert len(loads) == res["preset"]["num_layers"]
    for entry in loads.values():
        assert len(entry["tokens_per_expert"]) == res["preset"]["n_experts"]
        assert sum(entry["tokens_per_expert"]) == res["loss"]["moe"]["tokens"] * res["preset"]["top_k"]

    assert len(res["samples"]) == 3 and all(s["text"] for s in res["samples"])
    assert set(res["timing"]) >= {"corpus", "tokenizer", "pretrain", "upcycle", "continue_dense", "continue_moe"}


@pytest.mark.slow
def test_quick_demo_plots_are_valid_images(quick_run):
    from PIL import Image

    out, _ = quick_run
    for name in ("loss.png", "loss_continued.png", "expert_load.png", "ppl.png"):
        with Image.open(out / name) as img:
            img.verify()
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100


@pytest.mark.slow
def test_quick_demo_reloads_and_plots_with_other_commands(quick_run, tmp_path):
    """The saved MoE and the run directory work with ``myllm eval`` / ``myllm plot`` (``ppl.json`` etc.)."""
    from myllm.loading import load_model_and_tokenizer
    from myllm.plots import plot_run

    out, _ = quick_run
    model, tok = load_model_and_tokenizer(out / "moe" / "final")
    assert sum(1 for m in model.modules() if getattr(m, "is_moe", False)) == 2
    written = plot_run(out, out_dir=tmp_path)
    assert {p.name for p in written} == {"loss.png", "expert_load.png", "ppl.png"}


def test_bad_out_fails_clearly_and_touches_nothing(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    proc = _run_cli(["--quick", "--out", str(busy)], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "not a demo run" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]


def test_bad_out_is_refused_before_any_work(tmp_path):
    from myllm.demo import QUICK, run_demo

    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    for out in (a_file, a_file / "demo"):
        with pytest.raises(ValueError, match="is an existing file"):
            run_demo(out, preset=QUICK, echo=lambda s: None)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        run_demo(tmp_path / "demo", preset=QUICK, threads=0, echo=lambda s: None)
    assert a_file.read_text() == "keep" and [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_a_failed_run_leaves_the_previous_output_as_it_was(tmp_path, monkeypatch):
    from myllm.demo import QUICK, pipeline

    out = tmp_path / "demo"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"myllm_demo": 1, "marker": "previous run"}))

    def boom(root, preset, **kw):
        (root / "half-written.txt").write_text("x")
        raise RuntimeError("stage failed")

    monkeypatch.setattr(pipeline, "_stages", boom)
    with pytest.raises(RuntimeError, match="stage failed"):
        pipeline.run_demo(out, preset=QUICK, threads=1, echo=lambda s: None)
    assert json.loads((out / "results.json").read_text())["marker"] == "previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no staging directory left


def test_check_out_dir_accepts_new_empty_and_previous_runs(tmp_path):
    from myllm.demo import check_out_dir

    assert check_out_dir(tmp_path / "new" / "demo") == tmp_path / "new" / "demo"
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty")
    prev = tmp_path / "prev"
    prev.mkdir()
    (prev / "results.json").write_text(json.dumps({"myllm_demo": 1}))
    (prev / "report.md").write_text("old")
    check_out_dir(prev)
    (prev / "results.json").write_text(json.dumps({"other": 1}))  # not written by the demo: refused
    with pytest.raises(ValueError, match="not a demo run"):
        check_out_dir(prev)


def test_steps_override_validates(tmp_path):
    from myllm.demo import QUICK

    p = QUICK.with_steps(3, 2)
    assert (p.pretrain_steps, p.continue_steps) == (3, 2) and p.warmup_steps <= 2
    with pytest.raises(ValueError, match="step counts"):
        QUICK.with_steps(0, 2)
