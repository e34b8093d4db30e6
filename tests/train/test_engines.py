"""Engine settings that need no process group: the DeepSpeed config merge, bf16 autocast, the progress bar."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import run_config

from myllm.train import Trainer, parse_config
from myllm.train.engines.deepspeed_engine import build_ds_config


def _cfg(**engine):
    raw = {
        "output_dir": "o",
        "model": {"path": "m"},
        "data": {"path": "d"},
        "train": {"max_steps": 10, "micro_batch_size": 4, "grad_accum": 2, "grad_clip": 0.5},
    }
    return parse_config({**raw, "engine": {"kind": "deepspeed", **engine}})


def test_ds_config_from_the_run_config():
    ds = build_ds_config(_cfg(zero_stage=3), world_size=4, bf16=True)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 32 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3} and ds["bf16"] == {"enabled": True}


def test_user_json_is_kept_auto_is_filled_and_conflicts_are_errors(tmp_path):
    user = {
        "zero_optimization": {"stage": 2, "overlap_comm": True},
        "gradient_clipping": "auto",
        "train_micro_batch_size_per_gpu": 4,
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    ds = build_ds_config(_cfg(deepspeed_config=str(path)), world_size=2, bf16=False)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}  # the JSON's stage, as none was given
    assert ds["gradient_clipping"] == 0.5 and ds["train_batch_size"] == 16
    with pytest.raises(ValueError, match=r"sets zero_optimization.stage=2 but the run config implies 3"):
        build_ds_config(_cfg(deepspeed_config=str(path), zero_stage=3), world_size=2, bf16=False)
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=8"):
        build_ds_config(_cfg(deepspeed_config={"train_micro_batch_size_per_gpu": 8}), world_size=1, bf16=False)
    with pytest.raises(ValueError, match="has an 'optimizer' section"):
        build_ds_config(_cfg(deepspeed_config={"optimizer": {"type": "Adam"}}), world_size=1, bf16=False)
    with pytest.raises(FileNotFoundError, match="DeepSpeed config not found"):
        build_ds_config(_cfg(deepspeed_config=str(tmp_path / "nope.json")), world_size=1, bf16=False)


def test_bf16_autocast_trains_with_float32_master_weights(tmp_path, llama_dir, tokenizer_dir, text_data):
    cfg = parse_config(
        run_config(tmp_path, llama_dir, tokenizer_dir, text_data, engine={"device": "cpu", "precision": "bf16"})
    )
    trainer = Trainer(cfg)
    records = trainer.fit(steps=2)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert all(p.dtype == torch.float32 for p in trainer.module.parameters())
    fp32 = Trainer(parse_config(run_config(tmp_path / "fp32", llama_dir, tokenizer_dir, text_data)))
    assert fp32.fit(steps=1)[0]["loss"] != records[0]["loss"]  # bf16 really was used


def test_progress_bar_shows_loss_lr_and_throughput(tmp_path, llama_dir, tokenizer_dir, text_data, capsys):
    cfg = parse_config(run_config(tmp_path, llama_dir, tokenizer_dir, text_data, logging={"progress": True}))
    Trainer(cfg).fit()
    err = capsys.readouterr().err
    assert "4/4" in err and "loss=" in err and "lr=" in err and "tok_s=" in err
