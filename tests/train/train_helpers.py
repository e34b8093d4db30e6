"""Helpers of the training tests: a tiny byte-level BPE tokenizer trained on the fly, tiny HF models saved to
temporary directories, small JSONL corpora, a run-config builder and the environment of child processes."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import tiny_hf_model  # noqa: E402

from myllm.data import train_tokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 320  # 256 byte symbols + ChatML specials + a few merges

WORDS = (
    "the a model learns to predict next token from context small data tiny test loss goes down when training "
    "works well experts route tokens attention heads see previous words"
).split()


def make_texts(n: int, seed: int = 0, min_words: int = 3, max_words: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def make_conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        conv = [{"role": "system", "content": "be brief"}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            conv.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))})
            conv.append(
                {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))}
            )
        convs.append(conv)
    return convs


def build_tokenizer(path: Path, vocab_size: int = VOCAB, seed: int = 1) -> transformers.PreTrainedTokenizerBase:
    """A tiny byte-level BPE with ChatML specials and chat template, by the project's tokenizer trainer."""
    return train_tokenizer(make_texts(200, seed=seed), path, vocab_size=vocab_size, min_frequency=1)


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def save_tiny_model(path: Path, arch: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    overrides.setdefault("vocab_size", VOCAB)
    tiny_hf_model(arch, seed=seed, **overrides).save_pretrained(path)
    return path


def save_tiny_myllm_moe(path: Path, seed: int = 0) -> Path:
    """A tiny MyLLM MoE (dense first layer, 4 experts top-2 + a shared expert, Switch + aux-loss-free balancing)."""
    from myllm import MyLLMConfig, MyLLMForCausalLM

    config = MyLLMConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        ffn={
            "name": "moe",
            "n_experts": 4,
            "top_k": 2,
            "intermediate_size": 16,
            "n_shared_experts": 1,
            "score_func": "sigmoid",
            "balance": {"switch": 0.01, "loss_free": 0.001},
        },
        layer_overrides={"0": {"ffn": "dense"}},
    )
    transformers.set_seed(seed)
    MyLLMForCausalLM(config).save_pretrained(path)
    return path


def run_config(
    tmp_path: Path, model_dir: Path, tokenizer_dir: Path, data_path: Path, **sections: Any
) -> dict[str, Any]:
    """A small valid run-config dict; ``sections`` update (dict sections merge one level deep)."""
    cfg: dict[str, Any] = {
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(model_dir), "tokenizer": str(tokenizer_dir)},
        "data": {"path": str(data_path), "seq_len": 32},
        "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 1, "seed": 0},
        "optimizer": {"lr": 1e-3},
        "schedule": {"kind": "constant"},
        "logging": {"progress": False},
        "engine": {"device": "cpu"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a child process that must import this checkout of myllm."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env
