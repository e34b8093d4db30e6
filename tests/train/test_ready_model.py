"""Trainer(cfg, model=...): training a model changed in memory (surgery whose freezing is not saved)."""

from __future__ import annotations

import pytest
import torch
import transformers
from train_helpers import VOCAB, run_config
from utils import tiny_hf_model

from myllm import surgery
from myllm.train import Trainer, parse_config
from myllm.train.engines.torch_engine import TorchEngine


def _grown_moe():
    model = tiny_hf_model("qwen3_moe", vocab_size=VOCAB)
    surgery.add_experts(model, n_new=2, freeze_existing=True)
    return model


def _config(tmp_path, tokenizer_dir, text_data, **sections):
    # model.path is not read when a ready model is given; the tokenizer comes from model.tokenizer
    cfg = run_config(tmp_path, tmp_path / "unused", tokenizer_dir, text_data, **sections)
    return parse_config(cfg)


def test_a_ready_model_is_trained_with_its_frozen_expert_rows(tmp_path, tokenizer_dir, text_data):
    model = _grown_moe()
    experts = model.model.layers[0].mlp.experts
    before = {k: getattr(experts, k).detach().clone() for k in ("gate_up_proj", "down_proj")}
    cfg = _config(tmp_path, tokenizer_dir, text_data, optimizer={"lr": 1e-2, "weight_decay": 0.1})
    trainer = Trainer(cfg, model=model)
    assert trainer.module.model is model
    trainer.fit()
    for key, old in before.items():
        now = getattr(experts, key).detach()
        assert torch.equal(now[:4], old[:4]), f"{key}: a frozen expert row moved"
        assert not torch.equal(now[4:], old[4:]), f"{key}: the new experts did not train"
    result = trainer.export()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(result.final_dir).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model.eval()(ids).logits)


@pytest.mark.parametrize("freeze_existing", [True, False])
def test_a_grown_model_loaded_by_path_keeps_its_recorded_freezing(tmp_path, tokenizer_dir, text_data, freeze_existing):
    """Row freezing is not saved; the trainer re-applies what add_experts recorded (and nothing when it froze
    nothing: the paired case shows the old experts would move)."""
    model = tiny_hf_model("qwen3_moe", vocab_size=VOCAB)
    surgery.add_experts(model, n_new=2, freeze_existing=freeze_existing)
    model.save_pretrained(tmp_path / "grown")
    old = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    cfg = run_config(tmp_path, tmp_path / "grown", tokenizer_dir, text_data, optimizer={"lr": 1e-2})
    trainer = Trainer(parse_config(cfg))
    assert trainer.frozen_experts == ({"model.layers.0.mlp": 4, "model.layers.1.mlp": 4} if freeze_existing else {})
    trainer.fit()
    now = trainer.module.model.model.layers[0].mlp.experts.gate_up_proj.detach()
    assert torch.equal(now[:4], old[:4]) == freeze_existing
    assert not torch.equal(now[4:], old[4:])


def test_recorded_freezing_is_refused_by_the_deepspeed_engine(tmp_path, tokenizer_dir, text_data, monkeypatch):
    _grown_moe().save_pretrained(tmp_path / "grown")
    monkeypatch.setattr("myllm.train.core.build_engine", TorchEngine)  # no process group in the test process
    cfg = run_config(tmp_path, tmp_path / "grown", tokenizer_dir, text_data, engine={"kind": "deepspeed"})
    with pytest.raises(ValueError, match="row freezing works with torch optimizers only"):
        Trainer(parse_config(cfg))


def test_a_ready_model_is_refused_by_a_partitioning_engine(tmp_path, tokenizer_dir, text_data, monkeypatch):
    closed = []

    class Partitioned(TorchEngine):
        partitioned = True

        def close(self) -> None:
            closed.append(True)

    monkeypatch.setattr("myllm.train.core.build_engine", Partitioned)
    with pytest.raises(ValueError, match="ZeRO-3"):
        Trainer(_config(tmp_path, tokenizer_dir, text_data), model=_grown_moe())
    assert closed == [True]
