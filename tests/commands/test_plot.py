"""``myllm plot RUN_DIR``."""

from __future__ import annotations

import json

from myllm.cli import main


def test_plot_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 5 - 0.1 * i}) + "\n" for i in range(20)))
    assert main(["plot", str(run)]) == 0
    assert "loss.png" in capsys.readouterr().out
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_nothing_to_plot(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "nothing to plot" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
