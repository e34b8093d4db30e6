"""Checkpoints: every N steps, atomic, exact resume (model, optimizer, schedule, RNG, data position), refusal of
another model's checkpoint."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from train_helpers import run_config, save_tiny_model

from myllm.train import Trainer, parse_config, read_metrics
from myllm.train import checkpoint as ckpt_io


@pytest.fixture(scope="module")
def dropout_dir(tmp_path_factory):
    """Attention dropout makes the loss depend on the torch RNG, so a resume must restore it."""
    return save_tiny_model(tmp_path_factory.mktemp("dropout"), "llama", attention_dropout=0.2)


def _cfg(out, model_dir, tokenizer_dir, data, **sections):
    raw = run_config(out, model_dir, tokenizer_dir, data, **sections)
    raw.setdefault("schedule", {})
    raw["schedule"] = {"kind": "cosine", "warmup_steps": 2}
    return parse_config(raw)


def _losses(records):
    return {r["step"]: r["loss"] for r in records}


def test_checkpoints_every_n_steps_keep_the_newest(tmp_path, llama_dir, tokenizer_dir, text_data):
    cfg = _cfg(
        tmp_path, llama_dir, tokenizer_dir, text_data, train={"max_steps": 6}, checkpoint={"every": 2, "keep_last": 2}
    )
    Trainer(cfg).fit()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004", "step-00000006"]
    assert (root / "latest").read_text() == "step-00000006"
    files = {p.name for p in (root / "step-00000006").iterdir()}
    assert files == {"trainer_state.json", "rank0.json", "model.safetensors", "optimizer.pt"}
    state = ckpt_io.read_state(root / "step-00000006")
    assert state["step"] == 6 and state["tokens"] == 6 * 2 * 32 and state["engine"] == "torch"


def test_resume_gives_exactly_the_losses_of_an_uninterrupted_run(tmp_path, dropout_dir, tokenizer_dir, text_data):
    sections = {"train": {"max_steps": 6}, "checkpoint": {"every": 3}}
    full = Trainer(_cfg(tmp_path / "a", dropout_dir, tokenizer_dir, text_data, **sections)).fit()
    first = Trainer(_cfg(tmp_path / "b", dropout_dir, tokenizer_dir, text_data, **sections))
    first.fit(steps=4)  # checkpoint at 3, one more step that the resume redoes
    resumed = Trainer(_cfg(tmp_path / "b", dropout_dir, tokenizer_dir, text_data, **sections))
    assert resumed.step == 3
    rest = resumed.fit()
    assert _losses(rest) == {s: v for s, v in _losses(full).items() if s > 3}  # bit-exact
    assert _losses(read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")) == _losses(full)


@pytest.mark.parametrize("skip", ["rng", "data"])
def test_resume_without_rng_or_data_position_would_diverge(
    tmp_path, dropout_dir, tokenizer_dir, text_data, monkeypatch, skip
):
    """Non-vacuity of the exact-resume test: each restored piece of state matters."""
    sections = {"train": {"max_steps": 5}, "checkpoint": {"every": 3}}
    full = Trainer(_cfg(tmp_path / "a", dropout_dir, tokenizer_dir, text_data, **sections)).fit()
    Trainer(_cfg(tmp_path / "b", dropout_dir, tokenizer_dir, text_data, **sections)).fit(steps=3)
    if skip == "rng":
        monkeypatch.setattr(ckpt_io, "set_rng_state", lambda state: None)
    else:
        monkeypatch.setattr("myllm.train.data.sources._EpochSource.load_state_dict", lambda self, state: None)
    rest = Trainer(_cfg(tmp_path / "b", dropout_dir, tokenizer_dir, text_data, **sections)).fit()
    assert _losses(rest) != {s: v for s, v in _losses(full).items() if s > 3}


def test_a_failure_during_a_save_leaves_the_previous_checkpoint_intact(
    tmp_path, llama_dir, tokenizer_dir, text_data, monkeypatch
):
    cfg = _cfg(tmp_path, llama_dir, tokenizer_dir, text_data, train={"max_steps": 6}, checkpoint={"every": 2})
    trainer = Trainer(cfg)
    real_save = trainer.engine.save

    def failing_save(directory):
        if trainer.step == 4:
            (directory / "model.safetensors").write_bytes(b"half a file")
            raise OSError("disk full (injected)")
        real_save(directory)

    monkeypatch.setattr(trainer.engine, "save", failing_save)
    with pytest.raises(OSError, match="injected"):
        trainer.fit()
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text() == "step-00000002"
    assert (root / ".tmp-step-00000004").is_dir() and not (root / "step-00000004").exists()
    assert ckpt_io.find_latest(root) == root / "step-00000002"
    monkeypatch.undo()
    resumed = Trainer(cfg)
    assert resumed.step == 2 and not (root / ".tmp-step-00000004").exists()
    assert [r["step"] for r in resumed.fit()] == [3, 4, 5, 6]


def test_a_checkpoint_of_another_model_is_refused(tmp_path, llama_dir, tokenizer_dir, text_data):
    cfg = _cfg(tmp_path, llama_dir, tokenizer_dir, text_data, train={"max_steps": 2}, checkpoint={"every": 2})
    Trainer(cfg).fit()
    other = save_tiny_model(tmp_path / "qwen", "qwen2")
    with pytest.raises(ValueError, match="was written for a different model"):
        Trainer(_cfg(tmp_path, other, tokenizer_dir, text_data, train={"max_steps": 2}))
    explicit = {"resume": str(tmp_path / "run" / "checkpoints" / "step-00000002")}
    with pytest.raises(ValueError, match="different model"):
        Trainer(_cfg(tmp_path / "elsewhere", other, tokenizer_dir, text_data, checkpoint=explicit))
    lora = {"r": 2, "target_modules": ["q_proj"]}
    with pytest.raises(ValueError, match="different model"):
        Trainer(_cfg(tmp_path, llama_dir, tokenizer_dir, text_data, lora=lora))
    with pytest.raises(FileNotFoundError, match="checkpoint to resume not found"):
        Trainer(_cfg(tmp_path, llama_dir, tokenizer_dir, text_data, checkpoint={"resume": str(tmp_path / "nope")}))
    fresh = Trainer(_cfg(tmp_path, other, tokenizer_dir, text_data, checkpoint={"resume": "never"}))
    assert fresh.step == 0


def test_rng_state_round_trips_through_json():
    torch.manual_seed(123)
    state = json.loads(json.dumps(ckpt_io.rng_state()))
    a = (torch.rand(3), random.random(), np.random.rand())
    ckpt_io.set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
