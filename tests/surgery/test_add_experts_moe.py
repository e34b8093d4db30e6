"""add_experts on myllm ``moe`` blocks (an upcycled Llama): unchanged at insertion, trainable, round trip."""

from __future__ import annotations

import pytest
import torch
import transformers
from utils import assert_close, max_abs_diff, tiny_hf_model, tokens

import myllm  # noqa: F401
from myllm.factory import replace
from myllm.surgery import add_experts

moe = pytest.importorskip("myllm.blocks.ffn.moe", reason="the moe block comes from the moe branch")


def _upcycled(**kwargs):
    model = tiny_hf_model("llama")
    replace(model, "ffn", "moe", n_experts=4, top_k=2, **kwargs)
    return model


@pytest.mark.parametrize(
    "router", [{}, {"score_func": "sigmoid", "balance": {"loss_free": 1e-3}}], ids=["softmax", "sigmoid+bias"]
)
def test_add_experts_to_our_moe(router, tmp_path):
    model = _upcycled(**router)
    ids = tokens()
    ref = model(ids).logits
    add_experts(model, 2, layers=[0, 1])
    block = model.model.layers[0].mlp
    assert block.n_experts == block.experts.n_experts == block.gate.n_experts == 6
    assert block.gate.load_since_update.shape == (6,)  # per-expert buffers grow too
    assert max_abs_diff(model(ids).logits, ref) <= 1e-5
    assert block.last_router_logits.shape == (18, 6)
    assert torch.isfinite(block.aux_loss())
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6)
    with torch.no_grad():  # non-vacuity: a non-zero output projection of a new expert shows up
        block.experts.down_proj[4:] = block.experts.down_proj[:2]
    assert max_abs_diff(model(ids).logits, ref) > 1e-4


def test_new_experts_learn_old_stay_frozen_under_adamw():
    model = _upcycled(balance={"switch": 0.01})
    add_experts(model, 2, init="random")
    experts = model.model.layers[1].mlp.experts
    router = model.model.layers[1].mlp.gate
    before = [t.detach().clone() for t in (experts.gate_up_proj, experts.down_proj, router.weight)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    ids = tokens(2, 9, seed=4)
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for t, b in zip((experts.gate_up_proj, experts.down_proj, router.weight), before, strict=True):
        assert torch.equal(t[:4], b[:4])
        assert not torch.equal(t[4:], b[4:])
