"""Run metrics: one JSON object per logged step appended to a JSONL file, and a tqdm progress bar.

Resuming from step ``s`` drops the lines logged after ``s`` by the interrupted run (they are redone), so the
file always reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class MetricsWriter:
    """Appends ``{"step": ..., ...}`` lines to ``path`` (rank 0 only; other ranks pass ``enabled=False``)."""

    def __init__(self, path: Path, *, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Keep only the lines of steps <= ``step`` (atomic rewrite); a fresh run (step 0) empties the file."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Progress:
    """A tqdm bar over optimizer steps showing loss, learning rate and tokens/s (tqdm adds the ETA)."""

    def __init__(self, total: int, initial: int, *, enabled: bool) -> None:
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)

    def update(self, record: dict[str, Any] | None) -> None:
        if record is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['lr']:.2e}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                refresh=False,
            )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
