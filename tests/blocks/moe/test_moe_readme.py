"""The README's mixture-of-experts example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[3] / "README.md"


def test_readme_moe_example_runs(tmp_path, monkeypatch, capsys):
    section = README.read_text().split("## Mixture of experts", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme_moe_example"})
    assert "tokens_per_expert" in capsys.readouterr().out
