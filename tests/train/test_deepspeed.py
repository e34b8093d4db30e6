"""DeepSpeed engine: equal to the torch engine under ZeRO-0 in one process; ZeRO-2/3 across 2 ranks (gloo, CPU).

Each test starts child processes (DeepSpeed initialises torch.distributed, which must not leak into the test
process); all share one fresh TORCH_EXTENSIONS_DIR per session, where DeepSpeed JIT-builds its CPU comm extension
once (~40 s). Wall times are printed (run pytest with -s to see them).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import run_config, subprocess_env
from safetensors.torch import load_file
from utils import assert_close

WORKER = Path(__file__).with_name("ds_worker.py")
TIMEOUT = 600


def _run(tmp_path, env_dir, configs, nproc=1):
    paths = []
    for i, cfg in enumerate(configs):
        path = tmp_path / f"config{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        paths.append(str(path))
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out), *paths]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            "0",
            str(WORKER),
            str(out),
            *paths,
        ]
    env = subprocess_env(tmp_path)
    env["TORCH_EXTENSIONS_DIR"] = env_dir
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    print(f"\n[{nproc} process(es), {len(configs)} run(s)] wall time {wall:.1f} s")
    return out


def _result(out, i, rank):
    return json.loads((out / f"{i}-rank{rank}.json").read_text()), load_file(str(out / f"{i}-rank{rank}.safetensors"))


@pytest.mark.slow
def test_zero0_matches_the_torch_engine(tmp_path, llama_dir, tokenizer_dir, text_data, torch_extensions_dir):
    """Same seed and data: equal losses (1e-5, fp32) over 10 steps, with accumulation, clipping and warmup."""
    common = dict(
        train={"max_steps": 10, "micro_batch_size": 2, "grad_accum": 2, "grad_clip": 1.0},
        schedule={"kind": "cosine", "warmup_steps": 2},
        optimizer={"lr": 3e-3, "weight_decay": 0.1},
    )
    torch_cfg = run_config(tmp_path / "t", llama_dir, tokenizer_dir, text_data, **common)
    ds_cfg = run_config(
        tmp_path / "d",
        llama_dir,
        tokenizer_dir,
        text_data,
        **common,
        engine={"kind": "deepspeed", "zero_stage": 0, "device": "cpu"},
    )
    out = _run(tmp_path, torch_extensions_dir, [torch_cfg, ds_cfg])
    (ref, ref_params), (got, got_params) = _result(out, 0, 0), _result(out, 1, 0)
    assert [r["step"] for r in got["records"]] == list(range(1, 11))
    for a, b in zip(ref["records"], got["records"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and a["lr"] == b["lr"]
    assert max(r["grad_norm"] for r in ref["records"]) > 1.0  # clipping was active
    for name, p in ref_params.items():
        assert_close(got_params[name], p, atol=1e-5)
