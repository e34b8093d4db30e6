"""Plots: what is drawn equals the data (lines, heatmap cells, bar heights), run directories, bad input."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from myllm import plots

PNG = b"\x89PNG\r\n\x1a\n"


def records(n: int, start: float, slope: float) -> list[dict]:
    return [{"step": i + 1, "loss": start - slope * i, "lr": 1e-3} for i in range(n)]


def write_metrics(path, recs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


LOAD = {
    "model.layers.0.mlp": {"tokens_per_expert": [10, 30, 0, 60], "max_vio": 1.4},
    "model.layers.1.mlp": {"tokens_per_expert": [25, 25, 25, 25], "max_vio": 0.0},
}


def is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


def test_loss_figure_draws_raw_and_smoothed_values(tmp_path):
    dense, moe = records(20, 5.0, 0.1), records(20, 5.2, 0.12)
    write_metrics(tmp_path / "moe.jsonl", moe)
    fig = plots.loss_figure({"dense": dense, "moe": tmp_path / "moe.jsonl"}, smooth=0.5)
    ax = fig.axes[0]
    raw_dense, smooth_dense, raw_moe, _ = ax.lines
    assert np.allclose(raw_dense.get_ydata(), [r["loss"] for r in dense])
    assert np.allclose(smooth_dense.get_ydata(), plots.ema([r["loss"] for r in dense], 0.5))
    assert np.allclose(raw_moe.get_xdata(), [r["step"] for r in moe])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dense", "moe"]
    out = plots.plot_loss_curves({"dense": dense}, tmp_path / "loss.png")
    assert is_png(out)


def test_ema_is_bias_corrected():
    assert plots.ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert plots.ema([1.0, 3.0], 0.0) == [1.0, 3.0]


def test_expert_load_heatmap_cells_are_token_shares(tmp_path):
    fig = plots.expert_load_figure({"after upcycling": LOAD, "after training": LOAD})
    cells = np.asarray(fig.axes[0].images[0].get_array())
    assert np.allclose(cells, [[0.1, 0.3, 0.0, 0.6], [0.25] * 4])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["layer 0", "layer 1"]
    assert [t.get_text() for t in ax.child_axes[0].get_yticklabels()] == ["MaxVio 1.40", "MaxVio 0.00"]
    assert is_png(plots.plot_expert_load({"load": LOAD}, tmp_path / "load.png"))
    # panels share one colour scale (the colour bar applies to all of them)
    balanced = {"model.layers.0.mlp": {"tokens_per_expert": [5, 5, 5, 5], "max_vio": 0.0}}
    fig = plots.expert_load_figure({"skewed": LOAD, "balanced": balanced})
    panels = [a for a in fig.axes if a.images]
    assert [a.images[0].get_clim() for a in panels] == [(0, 0.6), (0, 0.6)]


def test_perplexity_bars_heights(tmp_path):
    results = {"dense": {"ppl": 40.0, "bits_per_byte": 1.9}, "moe": {"ppl": 35.5, "bits_per_byte": 1.8}}
    fig = plots.perplexity_figure(results)
    assert [b.get_height() for b in fig.axes[0].patches] == [40.0, 35.5]
    assert [b.get_height() for b in fig.axes[1].patches] == [1.9, 1.8]
    assert is_png(plots.plot_perplexity_bars(results, tmp_path / "ppl.png"))


def test_plot_run_draws_everything_the_run_has(tmp_path):
    run = tmp_path / "run"
    write_metrics(run / "dense" / "metrics.jsonl", records(10, 5, 0.1))
    write_metrics(run / "moe" / "metrics.jsonl", records(10, 5, 0.2))
    write_metrics(run / "runs" / "deep" / "metrics.jsonl", records(10, 5, 0.3))
    write_metrics(run / ".tmp-stage" / "metrics.jsonl", records(10, 5, 0.3))
    (run / "expert_load.json").write_text(json.dumps({"after training": LOAD}))
    (run / "ppl.json").write_text(json.dumps({"dense": {"ppl": 3.0, "bits_per_byte": 1.0}}))
    written = plots.plot_run(run, tmp_path / "figs")
    assert sorted(p.name for p in written) == ["expert_load.png", "loss.png", "ppl.png"]
    assert all(is_png(p) for p in written)
    assert sorted(plots.find_metrics(run)) == ["dense", "moe", "runs/deep"]


def test_plot_run_bad_input_writes_nothing(tmp_path):
    run = tmp_path / "run"
    write_metrics(run / "metrics.jsonl", records(5, 5, 0.1))
    (run / "ppl.json").write_text(json.dumps({"dense": {"ppl": "high"}}))
    with pytest.raises(ValueError, match="dense:ppl"):
        plots.plot_run(run)
    assert not list(run.glob("*.png")) and not list(run.glob(".*"))  # no plot, no temporary left behind
    (run / "ppl.json").unlink()
    (run / "expert_load.json").write_text(json.dumps({"x": {"model.layers.0.mlp": {"counts": [1, 2]}}}))
    with pytest.raises(ValueError, match="tokens_per_expert"):
        plots.plot_run(run)
    assert not list(run.glob("*.png"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    (run / "expert_load.json").unlink()
    with pytest.raises(ValueError, match="existing file"):
        plots.plot_run(run, blocker)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="nothing to plot"):
        plots.plot_run(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        plots.plot_run(tmp_path / "missing")


def test_metrics_reader_skips_a_cut_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert plots.read_metrics(path) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: invalid JSON"):
        plots.read_metrics(path)
    with pytest.raises(ValueError, match="no run has 'loss'"):
        plots.loss_figure({"a": [{"step": 1, "lr": 0.1}]})


def test_missing_matplotlib_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(plots.PlotDependencyError, match=r"pip install 'myllm\[plot\]'"):
        plots.plot_loss_curves({"a": records(3, 1, 0.1)}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
