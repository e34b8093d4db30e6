"""The loop on tokenised shards (``data.kind: shards``): mixtures, exact resume, tokenizer check; and a custom
WindowSource handed to the Trainer."""

from __future__ import annotations

import pytest
from train_helpers import build_tokenizer, make_texts, run_config, write_jsonl

from myllm.data import ShardError, tokenize_to_shards
from myllm.train import Trainer, parse_config
from myllm.train.data import PackedExamples, text_examples


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("shards")
    dirs = {}
    for name, seed in (("web", 11), ("code", 12)):
        src = write_jsonl(tmp / f"{name}.jsonl", [{"text": t} for t in make_texts(80, seed=seed)])
        tokenize_to_shards(src, tmp / name, tokenizer_dir, progress=False)
        dirs[name] = tmp / name
    return dirs


def _cfg(out, llama_dir, tokenizer_dir, path, **sections):
    raw = run_config(out, llama_dir, tokenizer_dir, "unused", **sections)
    raw["data"] = {"kind": "shards", "path": path, "seq_len": 32}
    return parse_config(raw)


def test_pretrain_on_a_shard_mixture_resumes_exactly(tmp_path, llama_dir, tokenizer_dir, shard_dirs):
    mixture = {str(shard_dirs["web"]): 0.7, str(shard_dirs["code"]): 0.3}
    sections = {"train": {"max_steps": 6}, "checkpoint": {"every": 3}}
    full = Trainer(_cfg(tmp_path / "a", llama_dir, tokenizer_dir, mixture, **sections)).fit()
    assert [r["step"] for r in full] == list(range(1, 7)) and full[-1]["tokens"] == 6 * 2 * 32
    Trainer(_cfg(tmp_path / "b", llama_dir, tokenizer_dir, mixture, **sections)).fit(steps=4)
    resumed = Trainer(_cfg(tmp_path / "b", llama_dir, tokenizer_dir, mixture, **sections))
    assert resumed.step == 3
    assert [(r["step"], r["loss"]) for r in resumed.fit()] == [(r["step"], r["loss"]) for r in full[3:]]


def test_shards_of_another_tokenizer_are_refused_before_training(tmp_path, llama_dir, shard_dirs):
    other = build_tokenizer(tmp_path / "other_tok", seed=3)
    assert len(other) == 320
    with pytest.raises(ShardError, match="fingerprint|tokenizer"):
        Trainer(_cfg(tmp_path, llama_dir, tmp_path / "other_tok", str(shard_dirs["web"])))
    assert not (tmp_path / "run").exists()


def test_shards_hold_text_only():
    base = {"output_dir": "o", "model": {"path": "m"}, "train": {"max_steps": 1}}
    with pytest.raises(ValueError, match="shards holds packed text"):
        parse_config({**base, "data": {"kind": "shards", "path": "s", "packing": False}})
    with pytest.raises(ValueError, match="objective sft needs chat data"):
        parse_config({**base, "data": {"kind": "shards", "path": "s"}, "objective": {"kind": "sft"}})
    with pytest.raises(ValueError, match="mixture needs data.kind: shards"):
        parse_config({**base, "data": {"path": {"a": 1.0}}})


def test_a_custom_window_source_replaces_the_data_section(tmp_path, llama_dir, tokenizer_dir, text_data):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    source = PackedExamples(text_examples(tok, ["only this text", "and this one"] * 20), seq_len=16, pad_id=0)
    cfg = parse_config(run_config(tmp_path, llama_dir, tokenizer_dir, tmp_path / "not-read.jsonl"))
    trainer = Trainer(cfg, source=source)
    assert trainer.fit(steps=2)[-1]["tokens"] == 2 * 2 * 16
    with pytest.raises(TypeError, match="must implement WindowSource"):
        Trainer(cfg, source=[1, 2, 3])
