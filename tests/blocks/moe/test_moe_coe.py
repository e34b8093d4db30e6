"""Chain-of-Experts: one expert pool iterated C times, a router per iteration, inner residual."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close, max_abs_diff

from myllm.blocks.ffn.moe import CoE, MoE
from myllm.blocks.ffn.moe.balance import switch_aux_loss

KW = {"hidden_size": 16, "n_experts": 6, "top_k": 2, "intermediate_size": 8, "n_shared_experts": 1}


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def _moe_with(coe: CoE, router_index: int) -> MoE:
    """An MoE holding CoE's experts, shared experts and router ``router_index``."""
    moe = MoE(**KW).eval()
    moe.experts, moe.shared_experts, moe.gate = coe.experts, coe.shared_experts, coe.gates[router_index]
    return moe


@pytest.mark.parametrize("inner_residual", [True, False])
def test_one_iteration_is_exactly_moe(inner_residual):
    coe = CoE(**KW, n_iterations=1, inner_residual=inner_residual).eval()
    _randomise(coe)
    x = torch.randn(2, 7, 16)
    assert torch.equal(coe(x), _moe_with(coe, 0)(x))


def test_two_iterations_follow_the_recurrence():
    coe = CoE(**KW, n_iterations=2).eval()
    _randomise(coe)
    x = torch.randn(2, 7, 16)
    step1, step2 = _moe_with(coe, 0), _moe_with(coe, 1)
    x1 = x + step1(x)
    x2 = x1 + step2(x1)
    assert_close(coe(x), x2 - x, atol=1e-5)
    # non-vacuity: the second iteration matters, and it uses its own router
    assert max_abs_diff(coe(x), x1 - x) > 1e-3
    assert max_abs_diff(coe(x), (x1 + step1(x1)) - x) > 1e-3


def test_without_inner_residual_and_shared_router():
    coe = CoE(**KW, n_iterations=3, inner_residual=False, independent_routers=False).eval()
    _randomise(coe)
    assert len(coe.gates) == 1
    x = torch.randn(2, 7, 16)
    step = _moe_with(coe, 0)
    assert_close(coe(x), step(step(step(x))), atol=1e-5)


def test_router_logits_and_aux_loss_cover_every_iteration():
    coe = CoE(**KW, n_iterations=3, balance={"switch": 1.0})
    _randomise(coe)
    coe(torch.randn(2, 7, 16))
    assert len(coe.last_router_logits_all) == 3
    assert coe.last_router_logits is coe.last_router_logits_all[-1]
    assert all(logits.shape == (14, 6) for logits in coe.last_router_logits_all)
    total = coe.aux_loss()
    expected = sum(switch_aux_loss(r.route.scores, r.route.indices, 6) for r in coe.records)
    assert_close(total, expected, atol=1e-6)
    assert max_abs_diff(total, switch_aux_loss(coe.records[-1].route.scores, coe.records[-1].route.indices, 6)) > 1e-3
    total.backward()
    for gate in coe.gates:
        assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_gradients_reach_every_parameter():
    coe = CoE(**KW, n_iterations=2, shared_gate=True)
    _randomise(coe)
    coe(torch.randn(2, 7, 16)).pow(2).mean().backward()
    for name, p in coe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
