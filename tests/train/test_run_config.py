"""Run config: YAML/JSON loading, relative paths, overrides and clear validation errors."""

from __future__ import annotations

import json

import pytest
import yaml

from myllm.train.config import ConfigError, RunConfig, apply_overrides, load_config, parse_config

MINIMAL = {
    "output_dir": "out",
    "model": {"path": "models/tiny"},
    "data": {"path": "data/a.jsonl"},
    "train": {"max_steps": 10},
}


def test_yaml_and_json_give_the_same_config_with_paths_relative_to_the_file(tmp_path):
    (tmp_path / "cfgs").mkdir()
    y = tmp_path / "cfgs" / "run.yaml"
    y.write_text(yaml.safe_dump(MINIMAL))
    j = tmp_path / "cfgs" / "run.json"
    j.write_text(json.dumps(MINIMAL))
    a, b = load_config(y), load_config(j)
    assert a == b
    assert a.model.path == str(tmp_path / "cfgs" / "models/tiny")
    assert a.model.tokenizer_path() == a.model.path
    assert a.output_dir == str(tmp_path / "cfgs" / "out")
    assert a.objective.kind == "pretrain" and a.engine.kind == "torch" and a.lora is None
    assert a.data_format == "text" and a.packing is True


def test_overrides_are_parsed_as_yaml(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text(yaml.safe_dump(MINIMAL))
    cfg = load_config(y, ["train.max_steps=3", "optimizer.lr=2e-3", "engine.kind=deepspeed", "engine.zero_stage=2"])
    assert cfg.train.max_steps == 3 and cfg.optimizer.lr == 2e-3 and cfg.engine.zero_stage == 2
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["train.max_steps"])


def _error(raw) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, source="run.yaml")
    return str(info.value)


def test_unknown_keys_and_bad_values_name_the_field():
    msg = _error({**MINIMAL, "train": {"max_steps": 10, "micro_batch": 4}})
    assert "run.yaml" in msg and "train.micro_batch: Extra inputs are not permitted" in msg
    msg = _error({**MINIMAL, "optimizer": {"lr": -1}})
    assert "optimizer.lr: Input should be greater than 0" in msg
    msg = _error({k: v for k, v in MINIMAL.items() if k != "train"})
    assert "train: Field required" in msg
    msg = _error({**MINIMAL, "objective": {"kind": "dpo"}})
    assert "objective" in msg and "pretrain" in msg


def test_cross_section_rules():
    assert "needs the deepspeed engine" in _error({**MINIMAL, "engine": {"zero_stage": 3}})
    assert "data.format must be `chat`" in _error(
        {**MINIMAL, "objective": {"kind": "sft"}, "data": {"path": "a", "format": "text"}}
    )
    assert "exactly one of `path`" in _error({**MINIMAL, "model": {"path": "a", "config": {"model_type": "llama"}}})
    assert "needs a `model_type`" in _error({**MINIMAL, "model": {"config": {"hidden_size": 8}, "tokenizer": "t"}})
    assert "model.tokenizer is required" in _error({**MINIMAL, "model": {"config": {"model_type": "llama"}}})
    assert "warmup_steps (20) > train.max_steps" in _error({**MINIMAL, "schedule": {"warmup_steps": 20}})
    assert "needs `target_modules`" in _error({**MINIMAL, "lora": {"r": 4}})
    distill = {"kind": "distill", "teacher": {"path": "t"}, "loss": "jsd", "beta": 1.0}
    assert "objective.beta: Input should be less than 1" in _error({**MINIMAL, "objective": distill})


def test_sft_defaults_to_padded_chat_and_config_round_trips():
    cfg = parse_config({**MINIMAL, "objective": {"kind": "sft"}})
    assert cfg.data_format == "chat" and cfg.packing is False
    assert RunConfig.model_validate(cfg.model_dump()) == cfg


def test_missing_or_unparsable_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad)
