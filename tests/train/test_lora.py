"""LoRA through PEFT: only adapters train; adapter and merged exports reproduce the trained model."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers
from train_helpers import run_config, save_tiny_model
from utils import assert_close

from myllm.train import Trainer, parse_config


def _cfg(tmp_path, model_dir, tokenizer_dir, data, lora, **sections):
    return parse_config(
        run_config(tmp_path, model_dir, tokenizer_dir, data, lora=lora, optimizer={"lr": 1e-2}, **sections)
    )


def test_lora_trains_only_adapters_and_exports_adapter_and_merged(tmp_path, llama_dir, tokenizer_dir, chat_data):
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    trainer = Trainer(_cfg(tmp_path, llama_dir, tokenizer_dir, chat_data, lora, objective={"kind": "sft"}))
    before = {n: p.detach().clone() for n, p in trainer.module.model.named_parameters()}
    trainer.fit()
    changed = {n for n, p in trainer.module.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at zero; it moving means the adapter really learned
    ids = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        expected = trainer.module.model.eval()(input_ids=ids).logits
    result = trainer.export()
    assert result.adapter_dir == tmp_path / "run" / "adapter" and result.final_dir == tmp_path / "run" / "final"
    merged = transformers.AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    adapted = peft.PeftModel.from_pretrained(base, result.adapter_dir)
    with torch.no_grad():
        assert_close(merged(input_ids=ids).logits, expected, atol=1e-5)
        assert_close(adapted(input_ids=ids).logits, expected, atol=1e-5)
    with pytest.raises(RuntimeError, match="cannot train further"):
        trainer.fit()


def test_lora_on_fused_expert_parameters(tmp_path, tokenizer_dir, text_data):
    moe_dir = save_tiny_model(tmp_path / "moe", "qwen2_moe")
    lora = {"r": 2, "target_modules": ["q_proj"], "target_parameters": ["mlp.experts.gate_up_proj"], "save": "adapter"}
    trainer = Trainer(_cfg(tmp_path, moe_dir, tokenizer_dir, text_data, lora, train={"max_steps": 2}))
    trainable = [n for n, p in trainer.module.named_parameters() if p.requires_grad]
    assert any("experts.lora_A" in n for n in trainable) and any("q_proj.lora_A" in n for n in trainable)
    assert not any("gate_up_proj" in n and "lora" not in n for n in trainable)
    trainer.fit()
    result = trainer.export()
    assert result.final_dir is None and (result.adapter_dir / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"target_modules": ["q_proj", "query"]}, r"target_modules \['query'\] match no module"),
        ({"target_modules": r".*\.attn\.q"}, "regex .* matches no module"),
        ({"target_parameters": ["mlp.experts.w1"]}, r"target_parameters \['mlp.experts.w1'\] match no parameter"),
    ],
)
def test_lora_targets_that_match_nothing_are_refused(tmp_path, llama_dir, tokenizer_dir, text_data, lora, message):
    with pytest.raises(ValueError, match=message) as info:
        Trainer(_cfg(tmp_path, llama_dir, tokenizer_dir, text_data, {"r": 2, **lora}))
    assert "q_proj" in str(info.value)  # the message lists what exists


def test_lora_works_with_distillation(tmp_path, llama_dir, tokenizer_dir, text_data):
    teacher = save_tiny_model(tmp_path / "teacher", "llama", seed=3)
    objective = {"kind": "distill", "teacher": {"path": str(teacher)}, "loss": "reverse_kl", "ce_weight": 0.2}
    trainer = Trainer(
        _cfg(
            tmp_path,
            llama_dir,
            tokenizer_dir,
            text_data,
            {"r": 2, "target_modules": "all-linear"},
            objective=objective,
            train={"max_steps": 2},
        )
    )
    trainable = {n for n, p in trainer.module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    records = trainer.fit()
    assert len(records) == 2 and records[-1]["kd"] > 0
