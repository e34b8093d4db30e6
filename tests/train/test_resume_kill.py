"""A run killed with SIGKILL mid-way resumes with exactly the losses of an uninterrupted run (CPU)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import yaml
from train_helpers import run_config, save_tiny_model, subprocess_env

from myllm.train import Trainer, parse_config, read_metrics

KILLED_RUN = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from myllm.train import Trainer, load_config

def kill_at(step):
    def callback(trainer):
        if trainer.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
    return callback

Trainer(load_config(sys.argv[1]), callbacks=[kill_at(int(sys.argv[2]))]).run()
"""


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tokenizer_dir, chat_data):
    model_dir = save_tiny_model(tmp_path / "model", "qwen2", attention_dropout=0.1)
    sections = dict(
        objective={"kind": "sft"},
        train={"max_steps": 8, "micro_batch_size": 2, "grad_accum": 2},
        schedule={"kind": "cosine", "warmup_steps": 2},
        checkpoint={"every": 2},
        data={"seq_len": 48},
    )
    killed = run_config(tmp_path / "killed", model_dir, tokenizer_dir, chat_data, **sections)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(killed))
    (tmp_path / "killed_run.py").write_text(KILLED_RUN)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "killed_run.py"), str(tmp_path / "run.yaml"), "5"],
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    out = tmp_path / "killed" / "run"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert (out / "checkpoints" / "latest").read_text() == "step-00000004"

    resumed = Trainer(parse_config(killed))
    assert resumed.step == 4
    resumed.run()
    reference = Trainer(parse_config(run_config(tmp_path / "ref", model_dir, tokenizer_dir, chat_data, **sections)))
    expected = [(r["step"], r["loss"], r["lr"]) for r in reference.fit()]
    got = [(r["step"], r["loss"], r["lr"]) for r in read_metrics(out / "metrics.jsonl")]
    assert got == expected  # bit-exact, including the steps redone after the kill
    assert (out / "final" / "model.safetensors").is_file()
