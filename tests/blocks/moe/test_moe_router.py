"""Router semantics: scores, top-k, renormalisation, scaling, temperature, groups, selection bias, jitter."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from utils import assert_close

from myllm.blocks.ffn.moe import Router


def _router(**kw) -> Router:
    torch.manual_seed(0)
    kw = {"hidden_size": 16, "n_experts": 8, "top_k": 2, **kw}
    r = Router(**kw)
    with torch.no_grad():
        r.weight.normal_(0, 1.0)
    return r


def test_softmax_topk_renormalised_and_scaled():
    r = _router(norm_topk_prob=True, routed_scaling_factor=2.5)
    x = torch.randn(11, 16)
    out = r(x)
    probs = (x @ r.weight.T).softmax(-1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(out.indices.sort(-1).values, top.indices.sort(-1).values)
    assert_close(out.weights.sum(-1), torch.full((11,), 2.5), atol=1e-6)
    assert_close(out.logits, x @ r.weight.T, atol=1e-5)


def test_without_renormalisation_weights_are_the_probabilities():
    r = _router(norm_topk_prob=False)
    x = torch.randn(11, 16)
    out = r(x)
    assert_close(out.weights, out.scores.gather(1, out.indices), atol=0)
    assert bool((out.weights.sum(-1) < 1).all())


def test_temperature_smooths_scores_but_keeps_the_choice():
    x = torch.randn(13, 16)
    cold, hot = _router(temperature=1.0)(x), _router(temperature=4.0)(x)
    assert torch.equal(cold.indices.sort(-1).values, hot.indices.sort(-1).values)  # monotone: same top-k
    assert_close(hot.scores, (cold.logits / 4.0).softmax(-1), atol=1e-6)
    # smoother: higher entropy for every token
    entropy = lambda p: -(p * p.log()).sum(-1)  # noqa: E731
    assert bool((entropy(hot.scores) > entropy(cold.scores)).all())


def test_sigmoid_group_limited_routing_stays_in_the_best_groups():
    r = _router(n_experts=8, top_k=3, score_func="sigmoid", n_group=4, topk_group=2, score_bias=True)
    x = torch.randn(50, 16)
    out = r(x)
    s = out.scores
    # expected groups: the two groups with the largest sum of their top-2 (biased) scores
    group_score = s.view(50, 4, 2).sum(-1)  # groups of 2: top-2 sum = sum
    best = group_score.topk(2, dim=-1).indices
    chosen_groups = out.indices // 2
    assert bool((chosen_groups.unsqueeze(-1) == best.unsqueeze(1)).any(-1).all())
    assert_close(out.weights.sum(-1), torch.ones(50), atol=1e-6)


def test_score_bias_changes_selection_only():
    r = _router(score_func="sigmoid", score_bias=True, norm_topk_prob=False)
    x = torch.randn(40, 16)
    before = r(x)
    with torch.no_grad():
        r.e_score_correction_bias[3] = 10.0  # expert 3 always selected
    after = r(x)
    assert bool((after.indices == 3).any(-1).all())
    # the weight of expert 3 is its unbiased sigmoid score, not score + bias
    w3 = after.weights[after.indices == 3]
    assert_close(w3, after.scores[:, 3], atol=0)
    assert_close(after.scores, before.scores, atol=0)
    assert not r.e_score_correction_bias.requires_grad
    assert "e_score_correction_bias" in r.state_dict()


def test_jitter_only_in_training():
    r = _router(jitter=0.5)
    x = torch.randn(64, 16)
    r.eval()
    assert torch.equal(r(x).logits, r(x).logits)
    r.train()
    assert not torch.equal(r(x).logits, r(x).logits)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 30), data=st.data())
def test_property_shapes_and_distinct_choices(n, data):
    n_group = data.draw(st.sampled_from([1, 2, 4]))
    per_group = data.draw(st.integers(1, 3))
    e = n_group * per_group
    topk_group = data.draw(st.integers(1, n_group))
    k = data.draw(st.integers(1, topk_group * per_group))
    score_func = data.draw(st.sampled_from(["softmax", "sigmoid"]))
    r = _router(n_experts=e, top_k=k, n_group=n_group, topk_group=topk_group, score_func=score_func)
    out = r(torch.randn(n, 16))
    assert out.logits.shape == out.scores.shape == (n, e)
    assert out.indices.shape == out.weights.shape == (n, k)
    assert bool((out.indices.sort(-1).values.diff(dim=-1) > 0).all())  # k distinct experts per token
    # selected experts come from at most topk_group groups
    assert bool(((out.indices // per_group).sort(-1).values.diff(dim=-1) != 0).sum(-1).lt(topk_group).all())
    assert torch.isfinite(out.weights).all()


@pytest.mark.parametrize("rate, expect", [(0.1, "moves"), (0.0, "stays")])
def test_update_bias_sign_rule(rate, expect):
    r = _router(n_experts=4, score_bias=True, bias_update_rate=rate)
    r.load_since_update.copy_(torch.tensor([10, 0, 5, 5]))  # mean 5
    r.update_bias()
    if expect == "moves":
        assert_close(r.e_score_correction_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]), atol=1e-7)
    else:
        assert r.e_score_correction_bias.abs().sum() == 0
    assert r.load_since_update.sum() == (0 if expect == "moves" else 20)
