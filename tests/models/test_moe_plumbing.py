"""The MoE contract inside MyLLM, with a tiny dummy ``is_moe`` FFN registered only for these tests.

The model must add every ``is_moe`` module's ``aux_loss(attention_mask)`` to the loss when labels are given,
return ``router_logits`` / ``aux_loss`` with ``output_router_logits``, and keep dense first layers through
``layer_overrides`` (DeepSeek's ``first_k_dense_replace``).
"""

from __future__ import annotations

import pytest
import torch
from pydantic import NonNegativeFloat, PositiveInt
from torch import nn
from utils import TINY_MYLLM, assert_close, tiny_myllm

from myllm import MyLLMForCausalLM, blocks
from myllm.blocks.ffn import DenseFFN
from myllm.blocks.registry import BlockConfig

E = 3


class SoftMoEConfig(BlockConfig):
    hidden_size: PositiveInt
    n_experts: PositiveInt = E
    aux_coef: NonNegativeFloat = 0.5


class SoftMoE(nn.Module):
    """Dense soft mixture of ``n_experts`` linear experts; its aux loss is ``coef * E * sum_e mean_t(p_te)^2``."""

    is_moe = True

    def __init__(self, *, hidden_size: int, n_experts: int = E, aux_coef: float = 0.5) -> None:
        super().__init__()
        self.router = nn.Linear(hidden_size, n_experts, bias=False)
        self.experts = nn.Parameter(torch.randn(n_experts, hidden_size, hidden_size) * 0.1)
        self.aux_coef = aux_coef
        self.last_router_logits: torch.Tensor | None = None
        self.last_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T, H]
        logits = self.router(hidden_states)  # (B, T, E)
        self.last_router_logits = logits.reshape(-1, logits.shape[-1])  # (B*T, E)
        expert_out = torch.einsum("bth,ehd->bted", hidden_states, self.experts)  # (B, T, E, H)
        return (logits.softmax(-1).unsqueeze(-1) * expert_out).sum(2)

    def aux_loss(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.last_mask = attention_mask
        probs = self.last_router_logits.softmax(-1)  # (B*T, E)
        if attention_mask is not None:
            probs = probs[attention_mask.reshape(-1).bool()]
        return self.aux_coef * probs.shape[-1] * probs.mean(0).pow(2).sum()


@pytest.fixture
def soft_moe():
    blocks.register("ffn", "test_soft_moe", config=SoftMoEConfig, example=lambda: {"hidden_size": 8})(SoftMoE)
    yield "test_soft_moe"
    blocks.unregister("ffn", "test_soft_moe")


def _model(name, **overrides):
    return tiny_myllm(num_hidden_layers=3, ffn={"name": name}, layer_overrides={"0": {"ffn": "dense"}}, **overrides)


def test_layer_overrides_keep_dense_first_layers(soft_moe):
    model = _model(soft_moe)
    assert isinstance(model.model.layers[0].mlp, DenseFFN)
    assert [type(layer.mlp) for layer in model.model.layers[1:]] == [SoftMoE, SoftMoE]
    assert model.moe_modules() == [model.model.layers[1].mlp, model.model.layers[2].mlp]


def test_aux_losses_are_added_to_the_loss_with_the_padding_mask(soft_moe):
    model = _model(soft_moe).train()
    x = torch.randint(0, 128, (2, 6))
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    labels = x.masked_fill(mask == 0, -100)
    out = model(x, attention_mask=mask, labels=labels)
    moe = model.moe_modules()
    expected_aux = sum(m.aux_loss(mask) for m in moe)
    assert_close(out.aux_loss, expected_aux, atol=1e-6)
    assert all(torch.equal(m.last_mask, mask) for m in moe)
    lm_only = model(x, attention_mask=mask, labels=labels).loss - out.aux_loss
    dense_loss = model.loss_function(logits=out.logits, labels=labels, vocab_size=128)
    assert_close(lm_only, dense_loss, atol=1e-5)
    assert out.aux_loss.item() > 0  # non-vacuous: the term is really there
    out.loss.backward()
    assert all(m.router.weight.grad.abs().sum() > 0 for m in moe)


def test_output_router_logits_and_aux_loss(soft_moe):
    model = _model(soft_moe, output_router_logits=False)
    x = torch.randint(0, 128, (2, 5))
    plain = model(x)
    assert plain.router_logits is None and plain.aux_loss is None
    out = model(x, output_router_logits=True)
    assert len(out.router_logits) == 2 and all(r.shape == (10, E) for r in out.router_logits)
    assert torch.isfinite(out.aux_loss) and out.loss is None
    # with a cache, the aux loss sees the mask of the new tokens only
    mask = torch.ones(2, 5, dtype=torch.long)
    first = model(x, attention_mask=mask, use_cache=True)
    step = model(
        x[:, -1:], attention_mask=torch.ones(2, 6, dtype=torch.long), cache=first.cache, output_router_logits=True
    )
    assert step.router_logits[0].shape == (2, E)
    assert model.moe_modules()[0].last_mask.shape == (2, 1)


def test_dense_models_report_no_aux_loss_and_moe_models_save_and_load(soft_moe, tmp_path):
    dense = tiny_myllm()
    x = torch.randint(0, 128, (2, 5))
    out = dense(x, labels=x, output_router_logits=True)
    assert out.aux_loss is None and out.router_logits is None
    model = _model(soft_moe)
    model.save_pretrained(tmp_path)
    back, info = MyLLMForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(back(x, labels=x).loss, model(x, labels=x).loss)
    assert back.config.layer_overrides == {"0": {"ffn": {"name": "dense"}}}
    assert TINY_MYLLM["hidden_size"] == back.model.layers[1].mlp.experts.shape[-1]
