"""Distillation: the objective composes CE, logit KD and intermediate-layer terms; teachers are checked."""

from __future__ import annotations

import pytest
import torch
from train_helpers import build_tokenizer, run_config, save_tiny_model
from utils import assert_close

from myllm.train import Trainer, parse_config
from myllm.train.losses import attention_kl_sum, kd_loss_sum


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    # a wider, deeper teacher with more heads: projections and head-averaged attention maps are needed
    return save_tiny_model(
        tmp_path_factory.mktemp("teacher"),
        "llama",
        seed=5,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
    )


def _distill(tmp_path, llama_dir, tokenizer_dir, data, teacher_dir, **objective):
    spec = {"kind": "distill", "teacher": {"path": str(teacher_dir), "tokenizer": str(tokenizer_dir)}, **objective}
    return parse_config(run_config(tmp_path, llama_dir, tokenizer_dir, data, objective=spec, train={"max_steps": 3}))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_logit_kd_loss_is_the_mix_of_ce_and_kd(tmp_path, llama_dir, tokenizer_dir, text_data, teacher_dir, kind):
    cfg = _distill(
        tmp_path, llama_dir, tokenizer_dir, text_data, teacher_dir, loss=kind, temperature=2.0, ce_weight=0.3, beta=0.4
    )
    trainer = Trainer(cfg)
    batch = trainer._next_batch()
    counts, _ = trainer._counts([batch])
    loss, metrics = trainer.engine.forward(batch, counts)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    with torch.no_grad():
        s = trainer.module.model(**inputs, use_cache=False).logits
        t = trainer.objective.teacher(**inputs, use_cache=False).logits
    kd = kd_loss_sum(s, t, batch["labels"], kind=kind, temperature=2.0, beta=0.4) / counts.items
    assert_close(metrics["kd"], kd, atol=1e-6)
    assert_close(loss.detach(), 0.3 * metrics["ce"] + 0.7 * kd, atol=1e-6)
    assert metrics["kd"] > 0
    records = trainer.fit()
    assert len(records) == 3 and all("kd" in r for r in records)


def test_intermediate_layer_terms_train_their_projection(tmp_path, llama_dir, tokenizer_dir, chat_data, teacher_dir):
    cfg = _distill(
        tmp_path,
        llama_dir,
        tokenizer_dir,
        chat_data,
        teacher_dir,
        ce_weight=0.5,
        hidden_layers=[{"student": 0, "teacher": 1}, {"student": 1, "teacher": 2, "weight": 0.5}],
        attention_layers=[{"student": 1, "teacher": 2}],
        hidden_weight=2.0,
        attention_weight=0.7,
    )
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"format": "chat", "packing": False})})
    trainer = Trainer(cfg)
    assert trainer.module.model.config._attn_implementation == "eager"  # attention maps need eager attention
    projections = dict(trainer.module.extras.named_parameters())
    assert set(projections) == {"hidden_proj_0.weight", "hidden_proj_1.weight"}
    assert projections["hidden_proj_0.weight"].shape == (48, 32)
    batch = trainer._next_batch()
    assert "attention_mask" in batch  # padded chat batches: padding is excluded from the feature losses
    counts, _ = trainer._counts([batch])
    loss, metrics = trainer.engine.forward(batch, counts)
    expected = 0.5 * metrics["ce"] + 0.5 * metrics["kd"] + 2.0 * metrics["hidden"] + 0.7 * metrics["attn"]
    assert_close(loss.detach(), expected, atol=1e-6)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask")}
    with torch.no_grad():
        s = trainer.module.model(**inputs, use_cache=False, output_attentions=True).attentions[1]
        t = trainer.objective.teacher(**inputs, use_cache=False, output_attentions=True).attentions[2]
    attn = attention_kl_sum(s, t, batch["attention_mask"].float()) / counts.tokens
    assert_close(metrics["attn"], attn, atol=1e-6)
    trainer.engine.backward(loss)
    for name, p in trainer.module.extras.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in trainer.objective.teacher.parameters())


def test_teacher_with_another_vocabulary_is_refused(tmp_path, llama_dir, tokenizer_dir, text_data):
    other = save_tiny_model(tmp_path / "t", "llama", vocab_size=384)
    with pytest.raises(ValueError, match=r"teacher vocabulary \(384 tokens\) differs from the student's \(320\)"):
        Trainer(_distill(tmp_path, llama_dir, tokenizer_dir, text_data, other))


def test_teacher_with_another_tokenizer_is_refused(tmp_path, llama_dir, tokenizer_dir, text_data, teacher_dir):
    other = build_tokenizer(tmp_path / "tok2", seed=7)  # same size, other merges: other ids for the same text
    assert len(other) == 320
    cfg = _distill(tmp_path, llama_dir, tokenizer_dir, text_data, teacher_dir)
    cfg.objective.teacher.tokenizer = str(tmp_path / "tok2")
    with pytest.raises(ValueError, match="teacher tokenizer differs"):
        Trainer(cfg)


def test_layer_pairs_must_exist(tmp_path, llama_dir, tokenizer_dir, text_data, teacher_dir):
    cfg = _distill(
        tmp_path, llama_dir, tokenizer_dir, text_data, teacher_dir, hidden_layers=[{"student": 2, "teacher": 0}]
    )
    with pytest.raises(ValueError, match=r"hidden_layers: pair \(student 2, teacher 0\) is out of range"):
        Trainer(cfg)
