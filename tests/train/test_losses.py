"""Distillation losses against plain float64 formulas written independently of the implementation."""

from __future__ import annotations

import math

import pytest
import torch
from utils import assert_close

from myllm.train.losses import IGNORE, attention_kl_sum, divergence, hidden_mse_sum, kd_loss_sum


def _softmax64(z, tau):
    z = z.double() / tau
    e = (z - z.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


def _kl64(p, q):  # sum_v p log(p / q), per row, with plain probabilities
    return (p * (p.log() - q.log())).sum(-1)


def reference(s_logits, t_logits, kind, tau, beta):
    p_s, p_t = _softmax64(s_logits, tau), _softmax64(t_logits, tau)
    if kind == "forward_kl":
        d = _kl64(p_t, p_s)
    elif kind == "reverse_kl":
        d = _kl64(p_s, p_t)
    else:
        m = beta * p_t + (1 - beta) * p_s
        d = beta * _kl64(p_t, m) + (1 - beta) * _kl64(p_s, m)
    return d * tau**2


CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]


@pytest.mark.parametrize(("kind", "beta"), CASES, ids=[f"{k}-{b}" for k, b in CASES])
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_divergences_match_float64_reference(kind, tau, beta):
    g = torch.Generator().manual_seed(0)
    s, t = 3 * torch.randn(13, 37, generator=g), 3 * torch.randn(13, 37, generator=g)
    got = divergence(s, t, kind=kind, temperature=tau, beta=beta)
    assert_close(got, reference(s, t, kind, tau, beta), atol=1e-6 * tau**2, rtol=1e-6)  # float32 vs float64
    assert (got > 0).all()  # non-vacuity: different distributions give a positive divergence
    assert_close(divergence(s, s, kind=kind, temperature=tau, beta=beta), torch.zeros(13), atol=1e-6)


def test_divergence_gradients_match_float64_reference():
    g = torch.Generator().manual_seed(1)
    s64 = torch.randn(5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 11, generator=g)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        s32 = s64.detach().float().requires_grad_()
        divergence(s32, t, kind=kind, temperature=2.0, beta=0.3).sum().backward()
        (ref_grad,) = torch.autograd.grad(reference(s64, t, kind, 2.0, 0.3).sum(), s64)
        assert_close(s32.grad, ref_grad, atol=1e-6)


def test_jsd_is_symmetric_at_half_and_bounded_by_log2():
    g = torch.Generator().manual_seed(2)
    s, t = 5 * torch.randn(7, 19, generator=g), 5 * torch.randn(7, 19, generator=g)
    a = divergence(s, t, kind="jsd", beta=0.5)
    assert_close(a, divergence(t, s, kind="jsd", beta=0.5), atol=1e-6)
    assert (a <= math.log(2) + 1e-6).all()
    assert not torch.allclose(divergence(s, t, kind="forward_kl"), divergence(s, t, kind="reverse_kl"))


def test_kd_sum_uses_shifted_target_positions_only():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 6, 9, generator=g), torch.randn(2, 6, 9, generator=g)
    labels = torch.tensor([[1, 2, IGNORE, 4, 5, 6], [IGNORE, IGNORE, 3, 4, IGNORE, IGNORE]])
    per = reference(s.reshape(-1, 9), t.reshape(-1, 9), "forward_kl", 1.5, 0.5).reshape(2, 6)
    # position i predicts label i + 1: kept positions are where labels[:, 1:] != IGNORE
    keep = [(0, 0), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2)]
    expected = sum(per[i, j] for i, j in keep)
    assert_close(kd_loss_sum(s, t, labels, kind="forward_kl", temperature=1.5), expected.reshape(()), atol=1e-5)
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence(s[0], t[0], kind="tvd")


def test_hidden_mse_matches_reference_and_ignores_padding():
    g = torch.Generator().manual_seed(4)
    hs, ht = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).float()
    expected = sum(
        ((hs[b, i].double() - ht[b, i].double()) ** 2).mean() for b in range(2) for i in range(5) if mask[b, i]
    )
    assert_close(hidden_mse_sum(hs, ht, mask), expected.reshape(()), atol=1e-5)
    changed = ht.clone()
    changed[0, 4] += 10  # a padded position: no effect
    assert hidden_mse_sum(hs, changed, mask) == hidden_mse_sum(hs, ht, mask)
    changed[0, 1] += 1  # a real position: an effect
    assert hidden_mse_sum(hs, changed, mask) != hidden_mse_sum(hs, ht, mask)


def _causal_attn(b, h, t, g):
    scores = torch.randn(b, h, t, t, generator=g)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)


def test_attention_kl_matches_reference_with_equal_and_different_head_counts():
    g = torch.Generator().manual_seed(5)
    a_s, a_t = _causal_attn(2, 4, 6, g), _causal_attn(2, 4, 6, g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]).float()

    def ref(ps, pt):
        total = 0.0
        for b in range(2):
            for i in range(6):
                if mask[b, i]:
                    rows = [
                        (
                            pt[b, h, i, : i + 1].double()
                            * (pt[b, h, i, : i + 1].double().log() - ps[b, h, i, : i + 1].double().log())
                        ).sum()
                        for h in range(ps.shape[1])
                    ]
                    total += sum(rows) / len(rows)
        return torch.as_tensor(total).detach()

    assert_close(attention_kl_sum(a_s, a_t, mask), ref(a_s, a_t).float(), atol=1e-5)
    a_t2 = _causal_attn(2, 2, 6, g)  # 2 teacher heads vs 4 student heads: compare head-averaged maps
    got = attention_kl_sum(a_s, a_t2, mask)
    assert_close(got, ref(a_s.mean(1, keepdim=True), a_t2.mean(1, keepdim=True)).float(), atol=1e-5)
    assert attention_kl_sum(a_s, a_s, mask).abs() < 1e-6
