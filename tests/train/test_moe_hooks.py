"""MoE hooks of the training loop: aux-loss-free bias update after each optimizer step, expert load logging."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import run_config  # noqa: E402

from myllm.blocks.ffn.moe import Router  # noqa: E402
from myllm.blocks.ffn.moe.balance import max_vio  # noqa: E402
from myllm.train import Trainer  # noqa: E402
from myllm.train.config import parse_config  # noqa: E402
from myllm.train.metrics import read_metrics  # noqa: E402

RATE = 0.01


def _moe_config(balance: dict) -> dict:
    return {
        "model_type": "myllm",
        "vocab_size": 320,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "ffn": {
            "name": "moe",
            "n_experts": 4,
            "top_k": 2,
            "intermediate_size": 16,
            "balance": balance,
            "score_func": "sigmoid",
        },
    }


def _trainer(tmp_path, tokenizer_dir, text_data, balance, name="run"):
    raw = run_config(
        tmp_path,
        tokenizer_dir,
        tokenizer_dir,
        text_data,
        train={"max_steps": 4, "grad_accum": 2},
        logging={"every": 1},
    )
    raw["output_dir"] = str(tmp_path / name)
    raw["model"] = {"config": _moe_config(balance), "tokenizer": str(tokenizer_dir)}
    return Trainer(parse_config(raw))


def _biases(trainer) -> dict[str, torch.Tensor]:
    return {
        name.rsplit(".", 1)[0]: m.e_score_correction_bias.clone()
        for name, m in trainer.module.model.named_modules()
        if isinstance(m, Router) and m.e_score_correction_bias is not None
    }


def test_loss_free_bias_moves_after_each_step_by_the_logged_load(tmp_path, tokenizer_dir, text_data):
    trainer = _trainer(tmp_path, tokenizer_dir, text_data, {"loss_free": RATE})
    before = _biases(trainer)
    assert len(before) == 2 and all(torch.equal(b, torch.zeros(4)) for b in before.values())
    expected = {k: v.clone() for k, v in before.items()}
    for _ in range(4):
        record = trainer.train_step()
        assert set(record["expert_load"]) == set(expected)
        for layer, counts in record["expert_load"].items():
            load = torch.tensor(counts, dtype=torch.float32)
            # every real token of both micro-batches routed to top_k = 2 experts
            assert load.sum() == 2 * 2 * trainer.cfg.train.micro_batch_size * trainer.cfg.data.seq_len
            expected[layer] += RATE * torch.sign(load.mean() - load)
        assert record["max_vio"] == pytest.approx(
            max(max_vio(torch.tensor(c)) for c in record["expert_load"].values())
        )
    after = _biases(trainer)
    for layer in expected:
        torch.testing.assert_close(after[layer], expected[layer], rtol=0, atol=1e-6)
        assert not torch.equal(after[layer], before[layer])  # the hook really ran
    logged = read_metrics(trainer.metrics.path)
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and all("expert_load" in r for r in logged)


def test_without_loss_free_balancing_no_bias_but_load_is_logged(tmp_path, tokenizer_dir, text_data):
    trainer = _trainer(tmp_path, tokenizer_dir, text_data, {"switch": 0.01}, name="switch")
    assert _biases(trainer) == {}
    records = trainer.fit()
    assert all(r["aux"] > 0 for r in records)  # the switch term is in the loss
    assert all(len(r["expert_load"]) == 2 for r in records)
