"""``myllm demo --quick`` runs as a subprocess on this checkout and shows the block swap and generation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_builds_swaps_and_generates(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    proc = subprocess.run(
        [sys.executable, "-m", "myllm", "demo", "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "['SdpaAttention', 'EagerAttention', 'SdpaAttention', 'EagerAttention']" in out
    assert "static cache gives the same tokens: True" in out
    diff = float(out.split("max |logit diff| = ")[1].split()[0])
    assert diff < 1e-5
