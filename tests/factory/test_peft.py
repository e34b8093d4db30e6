"""PEFT LoRA on surgically changed models (in memory and reloaded from disk)."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from utils import assert_close, max_abs_diff, tiny_hf_model, tokens

import myllm  # noqa: F401
from myllm.factory import replace
from myllm.surgery import add_experts


def _changed_model():
    model = tiny_hf_model("qwen3_moe")
    replace(model, "attention", "sdpa")  # myllm attention blocks (HF q/k/v/o names)
    replace(model, "norm", "layernorm", layers=[1])
    add_experts(model, 1)
    return model


def _lora() -> LoraConfig:
    return LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        init_lora_weights=False,  # random A and B: the adapter really changes the outputs
    )


def _train(model, steps=3):
    model.train()
    ids = tokens(2, 9, seed=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("from_disk", [False, True], ids=["in-memory", "reloaded"])
def test_lora_trains_merges_and_round_trips(from_disk, tmp_path):
    model = _changed_model()
    if from_disk:
        model.save_pretrained(tmp_path / "base")
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, _lora())
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("q_proj.lora_A" in n for n in names) and any("experts.lora_A" in n for n in names)
    assert all("lora_" in n for n in names)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    _train(peft_model)
    assert all(not torch.equal(p, before[n]) for n, p in peft_model.named_parameters() if p.requires_grad)

    ids = tokens()
    unmerged = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")

    merged = peft_model.merge_and_unload()
    assert_close(merged(input_ids=ids).logits, unmerged, atol=1e-4)
    assert max_abs_diff(merged(input_ids=ids).logits, tiny_hf_model("qwen3_moe")(ids).logits) > 1e-3

    # adapters load onto a fresh copy of the surgically changed base (from its own checkpoint)
    fresh = _changed_model() if not from_disk else transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert_close(reloaded(input_ids=ids).logits, unmerged, atol=1e-5)


def test_lora_on_an_upcycled_model_with_myllm_moe(tmp_path):
    pytest.importorskip("myllm.blocks.ffn.moe", reason="the moe block comes from the moe branch")
    model = tiny_hf_model("llama")
    replace(model, "ffn", "moe", n_experts=4, top_k=2, balance={"switch": 0.01})
    model.save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, _lora())
    assert any("experts.lora_A" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    _train(peft_model)  # labels: the LM loss plus the blocks' balancing loss
    ids = tokens()
    unmerged = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    assert_close(peft_model.merge_and_unload()(input_ids=ids).logits, unmerged, atol=1e-4)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert_close(PeftModel.from_pretrained(base, tmp_path / "adapter")(input_ids=ids).logits, unmerged, atol=1e-5)
