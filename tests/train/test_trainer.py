"""End-to-end runs of the loop: export, metrics, schedules, inline models, the CLI and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import transformers
import yaml
from train_helpers import run_config, save_tiny_model, subprocess_env, write_jsonl
from utils import assert_close

from myllm.cli import main as cli_main
from myllm.train import Trainer, parse_config, read_metrics, train


def _cfg(tmp_path, llama_dir, tokenizer_dir, data, **sections):
    return parse_config(run_config(tmp_path, llama_dir, tokenizer_dir, data, **sections))


def test_pretrain_exports_a_plain_hf_model_and_logs_metrics(tmp_path, llama_dir, tokenizer_dir, text_data):
    cfg = _cfg(tmp_path, llama_dir, tokenizer_dir, text_data, train={"max_steps": 12}, optimizer={"lr": 1e-2})
    trainer = Trainer(cfg)
    result = trainer.run()
    assert result.step == 12 and result.final_dir == tmp_path / "run" / "final"
    records = read_metrics(result.metrics_file)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {"loss", "ce", "lr", "grad_norm", "tokens", "tokens_per_s"} <= records[0].keys()
    assert records[-1]["tokens"] == 12 * 2 * 32  # packed windows: every position is a real token
    first, last = sum(r["loss"] for r in records[:3]), sum(r["loss"] for r in records[-3:])
    assert last < first  # it learns
    loaded = transformers.AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert (result.final_dir / "model.safetensors").is_file()
    assert transformers.AutoTokenizer.from_pretrained(result.final_dir).get_vocab()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, trainer.module.model.eval()(input_ids=ids).logits, atol=1e-6)
        original = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
        assert (loaded(input_ids=ids).logits - original(input_ids=ids).logits).abs().max() > 1e-3


def _expected_cosine(step, lr, warmup, total, floor):
    if step < warmup:
        return lr * step / warmup
    progress = (step - warmup) / (total - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_cosine_schedule_with_warmup_and_floor(tmp_path, llama_dir, tokenizer_dir, text_data):
    sched = {"kind": "cosine", "warmup_steps": 3, "min_lr_ratio": 0.1}
    cfg = _cfg(tmp_path, llama_dir, tokenizer_dir, text_data, train={"max_steps": 10}, schedule=sched)
    records = Trainer(cfg).fit()
    lrs = [r["lr"] for r in records]  # the learning rate each step used
    expected = [_expected_cosine(s, 1e-3, 3, 10, 0.1) for s in range(10)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_wsd_schedule_warms_up_holds_and_decays(tmp_path, llama_dir, tokenizer_dir, text_data):
    sched = {"kind": "wsd", "warmup_steps": 2, "decay_steps": 4, "min_lr_ratio": 0.0, "decay_type": "linear"}
    cfg = _cfg(tmp_path, llama_dir, tokenizer_dir, text_data, train={"max_steps": 12}, schedule=sched)
    lrs = [r["lr"] for r in Trainer(cfg).fit()]
    assert lrs[:2] == pytest.approx([0.0, 5e-4])
    assert lrs[2:8] == pytest.approx([1e-3] * 6)
    assert lrs[8:] == pytest.approx([1e-3 * (1 - k / 4) for k in range(4)])


@pytest.mark.parametrize("model_type", ["qwen2", "myllm"])
def test_inline_model_config_is_built_from_the_seed(tmp_path, tokenizer_dir, text_data, model_type):
    inline = {
        "model_type": model_type,
        "vocab_size": 320,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    raw = run_config(tmp_path, tokenizer_dir, tokenizer_dir, text_data, train={"max_steps": 2})
    raw["model"] = {"config": inline, "tokenizer": str(tokenizer_dir)}
    a = Trainer(parse_config(raw))
    raw["output_dir"] = str(tmp_path / "again")
    b = Trainer(parse_config(raw))
    assert a.module.model.config.model_type == model_type
    for p, q in zip(a.module.parameters(), b.module.parameters(), strict=True):
        assert torch.equal(p, q)
    assert a.fit()[-1]["loss"] == b.fit()[-1]["loss"]
    final = a.export().final_dir
    loaded = transformers.AutoModelForCausalLM.from_pretrained(final)
    ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, a.module.model.eval()(input_ids=ids).logits, atol=1e-6)


def test_bad_data_is_reported_before_training(tmp_path, llama_dir, tokenizer_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        Trainer(_cfg(tmp_path, llama_dir, tokenizer_dir, bad))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        Trainer(_cfg(tmp_path, llama_dir, tokenizer_dir, tmp_path / "missing.jsonl"))
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}])
    with pytest.raises(ValueError, match="empty dataset"):
        Trainer(_cfg(tmp_path, llama_dir, tokenizer_dir, empty))
    assert not (tmp_path / "run").exists()  # nothing was written


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, tokenizer_dir, text_data):
    small = save_tiny_model(tmp_path / "small", "llama", vocab_size=128)
    with pytest.raises(ValueError, match="tokenizer has 320 tokens but the model's vocabulary is 128"):
        Trainer(_cfg(tmp_path, small, tokenizer_dir, text_data))


def test_cli_trains_from_a_yaml_file_and_reports_errors_in_one_line(
    tmp_path, llama_dir, tokenizer_dir, text_data, capsys
):
    cfg = run_config(tmp_path, llama_dir, tokenizer_dir, text_data, train={"max_steps": 2})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "myllm", "train", str(tmp_path / "run.yaml"), "--set", "train.max_steps=3"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "final model:" in proc.stdout
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    # the error path, in-process (same entry point as the console script)
    assert cli_main(["train", str(tmp_path / "run.yaml"), "--set", "engine.zero_stage=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("myllm train: error:") and "needs the deepspeed engine" in err


def test_train_function_accepts_a_path(tmp_path, llama_dir, tokenizer_dir, text_data):
    cfg = run_config(tmp_path, llama_dir, tokenizer_dir, text_data, train={"max_steps": 1})
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    result = train(tmp_path / "run.json", overrides=["checkpoint.save_final=false"])
    assert result.step == 1 and result.final_dir is None and len(result.history) == 1
