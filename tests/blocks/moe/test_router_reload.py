"""A reloaded MoE's first aux-loss-free bias update matches the in-memory model's: the router's load counter
(a non-persistent buffer that transformers v5 materialises with ``torch.empty``) starts at zero after
``from_pretrained``, for MyLLM and for a surgically changed HF model."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from utils import tiny_hf_model, tiny_myllm

from myllm import MyLLMConfig, MyLLMForCausalLM, factory
from myllm.blocks.ffn.moe import Router, update_router_bias

BALANCE = {"loss_free": 0.01}


def _myllm() -> torch.nn.Module:
    torch.manual_seed(0)
    moe = {"name": "moe", "n_experts": 4, "top_k": 2, "intermediate_size": 16, "balance": BALANCE}
    cfg = MyLLMConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, ffn=moe
    )
    return MyLLMForCausalLM(cfg)


def _upcycled_llama() -> torch.nn.Module:
    model = tiny_hf_model("llama")
    factory.replace(model, "ffn", "moe", n_experts=4, top_k=2, init="copy", balance=BALANCE)
    return model


def _bias_after_one_step(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    model.train()
    with torch.no_grad():
        model(ids)
    update_router_bias(model)
    return [m.e_score_correction_bias.clone() for m in model.modules() if isinstance(m, Router)]


@pytest.mark.parametrize("build", [_myllm, _upcycled_llama], ids=["myllm", "myllm_llama"])
def test_reloaded_router_counters_start_at_zero(build, tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    routers = [m for m in reloaded.modules() if isinstance(m, Router)]
    assert routers and all(int(r.load_since_update.abs().sum()) == 0 for r in routers)

    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    expected = _bias_after_one_step(model, ids)
    got = _bias_after_one_step(reloaded, ids)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert any(b.abs().sum() > 0 for b in got)  # the step did move the biases

    # non-vacuity: a counter holding stale counts gives another first update, which the comparison sees
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    first = next(m for m in again.modules() if isinstance(m, Router))
    first.load_since_update.copy_(torch.arange(first.n_experts) * 10**6)  # uneven, as garbage is
    stale = _bias_after_one_step(again, ids)
    assert not all(torch.equal(a, b) for a, b in zip(expected, stale, strict=True))


def test_a_model_deep_copies_after_a_training_forward():
    """The last forward's routing (tensors of a live graph) is not copied; the copy computes the same thing."""
    model = tiny_myllm(num_hidden_layers=2, ffn={"name": "moe", "n_experts": 4, "top_k": 2, "intermediate_size": 16})
    model.train()
    ids = torch.randint(0, 64, (2, 7))
    model(ids, labels=ids).loss.backward()
    block = model.model.layers[1].mlp
    assert block.records  # the original keeps its routing for the balancing loss and the load statistics
    twin = copy.deepcopy(model)
    assert twin.model.layers[1].mlp.records == [] and block.records
    model.eval()
    twin.eval()
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, model(ids).logits)
