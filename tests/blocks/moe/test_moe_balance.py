"""Balancing: Switch aux loss vs HF, DeepSeek sequence-wise aux, z-loss vs HF, aux-loss-free bias updates."""

from __future__ import annotations

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func
from utils import assert_close

from myllm import blocks
from myllm.blocks.ffn.moe import MoE, update_router_bias
from myllm.blocks.ffn.moe.balance import max_vio, seq_aux_loss, switch_aux_loss


def _moe(**kw) -> MoE:
    torch.manual_seed(0)
    m = MoE(**{"hidden_size": 16, "n_experts": 6, "top_k": 2, "intermediate_size": 8, **kw})
    with torch.no_grad():
        m.gate.weight.normal_(0, 1.0)
    return m


def _mask(b: int, t: int) -> torch.Tensor:
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, : t // 2] = 0  # left padding in the first sequence
    mask[-1, -2:] = 0  # right padding in the last
    return mask


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_switch_loss_matches_hf_load_balancing_loss_func(masked):
    m = _moe(balance={"switch": 0.5})
    x = torch.randn(3, 9, 16)
    m(x)
    mask = _mask(3, 9) if masked else None
    hf = load_balancing_loss_func((m.last_router_logits,), m.n_experts, m.top_k, mask)
    assert_close(m.aux_loss(mask), 0.5 * hf, atol=1e-6)
    if masked:  # non-vacuity: ignoring the mask gives a different value
        other = load_balancing_loss_func((m.last_router_logits,), m.n_experts, m.top_k, None)
        assert abs(other.item() - hf.item()) > 1e-4  # HF's own value changes with the mask


def test_switch_loss_equals_k_at_perfect_balance():
    n, e, k = 12, 6, 2
    scores = torch.full((n, e), 1.0 / e)
    indices = torch.stack([torch.tensor([i % e, (i + 1) % e]) for i in range(n)])
    assert_close(switch_aux_loss(scores, indices, e), torch.tensor(float(k)), atol=1e-6)


def _seq_aux_by_loops(scores, indices, e, mask):
    """DeepSeek-V3 eq. (17)-(20) spelled out per sequence and token."""
    b, t, k = indices.shape
    total, seqs = 0.0, 0
    for i in range(b):
        rows = [j for j in range(t) if mask is None or mask[i, j]]
        if not rows:
            continue
        seqs += 1
        for ex in range(e):
            f = e / (k * len(rows)) * sum(int(ex in indices[i, j].tolist()) for j in rows)
            p = sum(float(scores[i, j, ex] / scores[i, j].sum()) for j in rows) / len(rows)
            total += f * p
    return total / seqs


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_sequence_wise_aux_loss_matches_the_formula(masked):
    m = _moe(score_func="sigmoid", balance={"seq_aux": 0.01})
    x = torch.randn(3, 7, 16)
    m(x)
    mask = _mask(3, 7) if masked else None
    route = m.records[-1].route
    expected = _seq_aux_by_loops(route.scores.detach().view(3, 7, -1), route.indices.view(3, 7, -1), 6, mask)
    assert abs(m.aux_loss(mask).item() - 0.01 * expected) < 1e-7


def test_sequence_wise_differs_from_batch_wise():
    """Non-vacuity: per-sequence balance is not the batch balance when sequences route differently."""
    e = 4
    scores = torch.full((2, 4, e), 0.1)
    scores[0, :, 0] = scores[1, :, 1] = 0.7
    indices = torch.tensor([[[0]] * 4, [[1]] * 4])  # each sequence uses one expert; the batch uses two
    seq = seq_aux_loss(scores, indices, e)
    batch = switch_aux_loss(scores.view(8, e), indices.view(8, 1), e)
    assert_close(seq, torch.tensor(2.8), atol=1e-6)  # 4 * 0.7 in each sequence
    assert_close(batch, torch.tensor(1.6), atol=1e-6)  # 2 * 0.4 + 2 * 0.4 over the batch


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_z_loss_matches_hf(masked):
    m = _moe(balance={"z_loss": 2.0})
    x = torch.randn(2, 5, 16)
    m(x)
    logits = m.last_router_logits
    if masked:
        mask = _mask(2, 5)
        keep = mask.reshape(-1).bool()
        expected = router_z_loss_func(logits[keep].view(1, -1, logits.shape[-1]))
    else:
        mask, expected = None, router_z_loss_func(logits.view(2, 5, -1))
    assert_close(m.aux_loss(mask), 2.0 * expected, atol=1e-5)


def test_terms_combine_and_get_gradients():
    m = _moe(balance={"switch": 0.1, "seq_aux": 0.2, "z_loss": 0.3})
    m(torch.randn(2, 5, 16))
    parts = {}
    for mode in ("switch", "seq_aux", "z_loss"):
        m.balance = {mode: 1.0}
        parts[mode] = m.aux_loss()
    m.balance = {"switch": 0.1, "seq_aux": 0.2, "z_loss": 0.3}
    total = m.aux_loss()
    assert_close(total, 0.1 * parts["switch"] + 0.2 * parts["seq_aux"] + 0.3 * parts["z_loss"], atol=1e-6)
    total.backward()
    assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0


def test_no_balancing_gives_a_zero_tensor():
    m = _moe()
    m(torch.randn(2, 5, 16))
    loss = m.aux_loss()
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and float(loss) == 0.0
    m2 = _moe(balance={"loss_free": 1e-3})  # acts on the bias, not on the loss
    m2(torch.randn(2, 5, 16))
    assert float(m2.aux_loss()) == 0.0


def test_loss_free_bias_balances_a_skewed_router():
    """Repeated updates drive MaxVio down on fixed inputs; the bias is saved and loaded with the block."""
    m = _moe(n_experts=4, top_k=1, score_func="sigmoid", balance={"loss_free": 0.05})
    with torch.no_grad():
        m.gate.weight[0] += 1.5  # expert 0 attracts most tokens
    x = torch.randn(256, 16) + 0.3
    m.train()
    m(x)
    start = max_vio(m.last_loads[0])
    for _ in range(60):
        m(x)
        update_router_bias(m)
    m(x)
    end = max_vio(m.last_loads[0])
    assert end < 0.5 * start, (start, end)
    bias = m.gate.e_score_correction_bias
    assert bias[0] < 0 and float(bias.abs().sum()) > 0
    state = m.state_dict()
    assert "gate.e_score_correction_bias" in state and "gate.load_since_update" not in state
    fresh = _moe(n_experts=4, top_k=1, score_func="sigmoid", balance={"loss_free": 0.05})
    fresh.load_state_dict(state)
    assert torch.equal(fresh.gate.e_score_correction_bias, bias)


def test_loss_free_counts_only_training_forwards_and_skip_padding():
    m = _moe(balance={"loss_free": 0.01})
    x = torch.randn(2, 6, 16)
    m.eval()
    m(x)
    assert m.gate.load_since_update.sum() == 0
    m.train()
    m(x)
    assert m.gate.load_since_update.sum() == 2 * 6 * 2
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    m.aux_loss(mask)
    m.aux_loss(mask)  # excluded once only
    assert m.gate.load_since_update.sum() == (2 * 6 - 2) * 2
    assert sum(m.last_loads[0].tolist()) == (2 * 6 - 2) * 2


@pytest.mark.parametrize("mode", ["switch", "seq_aux", "z_loss", "loss_free"])
def test_every_mode_is_accepted_by_the_registry(mode):
    m = blocks.build("ffn", "moe", hidden_size=8, n_experts=4, top_k=2, intermediate_size=4, balance={mode: 0.1})
    m(torch.randn(1, 3, 8))
    assert torch.isfinite(m.aux_loss())
