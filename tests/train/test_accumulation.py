"""Gradient accumulation is normalised by the target tokens of the whole step: 4 x batch 1 == batch 4."""

from __future__ import annotations

import pytest
import torch
from train_helpers import run_config, save_tiny_model
from utils import assert_close

from myllm.train import Trainer, parse_config


def _trainer(tmp_path, model_dir, tokenizer_dir, chat_data, micro, accum, **extra):
    cfg = run_config(
        tmp_path / f"m{micro}a{accum}",
        model_dir,
        tokenizer_dir,
        chat_data,
        objective={"kind": "sft"},
        data={"seq_len": 48, "shuffle": False},
        train={"max_steps": 3, "micro_batch_size": micro, "grad_accum": accum, "grad_clip": None},
        checkpoint={"resume": "never", "save_final": False},
        **extra,
    )
    return Trainer(parse_config(cfg))


def _grads_of_one_step(trainer):
    micro = [trainer._next_batch() for _ in range(trainer.cfg.train.grad_accum)]
    counts, _ = trainer._counts(micro)
    total = 0.0
    for batch in micro:
        loss, _ = trainer.engine.forward(batch, counts)
        trainer.engine.backward(loss)
        total += loss.item()
    grads = {n: p.grad.clone() for n, p in trainer.module.named_parameters()}
    return total, grads, micro


def test_four_micro_batches_of_one_equal_one_batch_of_four(tmp_path, llama_dir, tokenizer_dir, chat_data):
    big = _trainer(tmp_path, llama_dir, tokenizer_dir, chat_data, micro=4, accum=1)
    small = _trainer(tmp_path, llama_dir, tokenizer_dir, chat_data, micro=1, accum=4)
    loss_big, grads_big, _ = _grads_of_one_step(big)
    loss_small, grads_small, micro = _grads_of_one_step(small)
    assert abs(loss_big - loss_small) < 1e-5
    for name, g in grads_big.items():
        assert_close(grads_small[name], g, atol=1e-6)
    # non-vacuity: the micro-batches have different target counts, so a mean of per-micro-batch means differs
    targets = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]
    assert len(set(targets)) > 1
    naive = 0.0
    for batch in micro:
        out = small.module.model(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}, labels=batch["labels"]
        )
        naive += out.loss.item() / len(micro)
    assert abs(naive - loss_big) > 1e-3


def test_accumulated_training_follows_the_same_trajectory(tmp_path, llama_dir, tokenizer_dir, chat_data):
    big = _trainer(tmp_path, llama_dir, tokenizer_dir, chat_data, micro=4, accum=1)
    small = _trainer(tmp_path, llama_dir, tokenizer_dir, chat_data, micro=2, accum=2)
    a, b = big.fit(), small.fit()
    assert [r["step"] for r in a] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) < 1e-5 and ra["tokens"] == rb["tokens"]
    for p, q in zip(big.module.parameters(), small.module.parameters(), strict=True):
        assert_close(q, p, atol=1e-5)


def test_moe_aux_loss_is_included_once_per_step(tmp_path, tokenizer_dir, chat_data):
    moe_dir = save_tiny_model(tmp_path / "moe", "qwen2_moe", router_aux_loss_coef=0.1)
    trainer = _trainer(tmp_path, moe_dir, tokenizer_dir, chat_data, micro=1, accum=2)
    micro = [trainer._next_batch() for _ in range(2)]
    counts, _ = trainer._counts(micro)
    model = trainer.module.model
    losses, auxes = [], []
    for batch in micro:
        loss, metrics = trainer.engine.forward(batch, counts)
        losses.append(loss.item())
        assert_close(loss.detach(), metrics["ce"] + metrics["aux"], atol=1e-6)
        with torch.no_grad():
            out = model(
                **{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}, output_router_logits=True
            )
        auxes.append(0.1 * out.aux_loss.item())
        assert metrics["aux"].item() == pytest.approx(0.1 * out.aux_loss.item() / 2, rel=1e-5)  # half per micro-batch
    assert min(auxes) > 0  # the balancing term is really there
