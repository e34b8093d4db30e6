"""Atomic training checkpoints and the state a bit-exact resume needs.

Layout under ``<output_dir>/checkpoints/``::

    step-00000100/            a complete checkpoint (only ever appears by an atomic rename)
        trainer_state.json    step, tokens, data position, model fingerprint (written last)
        rank0.json            each rank's generator states (python, numpy, torch, CUDA) and data position
        ...                   the engine's files (weights, optimizer, scheduler)
    latest                    name of the newest complete checkpoint (replaced atomically)
    .tmp-step-00000200/       a save in progress; never read, removed on the next start

A crash (or a kill) during a save leaves the previous checkpoints and ``latest`` untouched. Saving is
collective under data parallelism: every rank writes its part into the temporary folder, then rank 0 renames.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace`` (readers see old or new, never half)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """JSON-serialisable states of the python, numpy and torch (CPU and CUDA) generators."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``latest`` pointer, else the highest complete step)."""
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / STATE_FILE).is_file():
            return cand
    complete = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


def read_state(ckpt: Path) -> dict[str, Any]:
    if not (ckpt / STATE_FILE).is_file():
        raise FileNotFoundError(f"not a complete checkpoint (no {STATE_FILE}): {ckpt}")
    return json.loads((ckpt / STATE_FILE).read_text())


def clean_partial(root: Path) -> None:
    """Remove leftovers of interrupted saves (rank 0, before training)."""
    for tmp in root.glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def save(
    root: Path,
    step: int,
    *,
    write_engine: Callable[[Path], None],
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    rank: int,
    barrier: Callable[[], None],
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically; collective over ranks. Returns the final directory.

    ``write_engine(tmp_dir)`` writes weights, optimizer and scheduler (every rank calls it); every rank adds
    its ``rank_state`` (e.g. its data position) and generator states as ``rank<r>.json``. Rank 0 writes
    ``trainer_state.json`` last, renames the folder into place, updates ``latest`` and prunes old checkpoints.
    """
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    write_engine(tmp)
    write_json_atomic(tmp / f"rank{rank}.json", {**rank_state, "rng": rng_state()})
    barrier()
    if rank == 0:
        write_json_atomic(tmp / STATE_FILE, trainer_state)
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. resumed, then saved again): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_pointer(root, final.name)
        _prune(root, keep_last)
    barrier()
    return final


def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    tmp.write_text(name)
    os.replace(tmp, root / LATEST)


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_rank_state(ckpt: Path, rank: int) -> dict[str, Any]:
    """Restore this rank's generator states from checkpoint ``ckpt`` and return the rest of its rank state."""
    path = ckpt / f"rank{rank}.json"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} has no state for rank {rank} (saved with fewer ranks?)")
    state = json.loads(path.read_text())
    set_rng_state(state.pop("rng"))
    return state
