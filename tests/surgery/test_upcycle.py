"""Pure dense -> fused-experts transforms (HF v5 layout: gate rows first, down [E, H, I])."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from utils import max_abs_diff, rel_rms

from myllm.surgery import expert_as_dense, split_permutation, upcycle_dense

H, I = 16, 24  # noqa: E741  (the layout legend: H hidden, I intermediate)


def _dense(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "gate_proj.weight": torch.randn(I, H, generator=g, dtype=dtype),
        "up_proj.weight": torch.randn(I, H, generator=g, dtype=dtype),
        "down_proj.weight": torch.randn(H, I, generator=g, dtype=dtype),
    }


def dense_mlp(sd, x):
    return F.linear(
        F.silu(F.linear(x, sd["gate_proj.weight"])) * F.linear(x, sd["up_proj.weight"]), sd["down_proj.weight"]
    )


def expert_out(experts, e, x):
    """Reference fused-layout expert, exactly as HF's eager experts compute it."""
    gate, up = F.linear(x, experts["gate_up_proj"][e]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, experts["down_proj"][e])


def test_copy_every_expert_is_the_dense_mlp():
    sd, x = _dense(), torch.randn(5, H)
    ex = upcycle_dense(sd, n_experts=4, init="copy")
    assert ex["gate_up_proj"].shape == (4, 2 * I, H) and ex["down_proj"].shape == (4, H, I)
    for e in range(4):
        assert torch.equal(expert_out(ex, e, x), dense_mlp(sd, x))
        assert all(torch.equal(v, sd[k]) for k, v in expert_as_dense(ex, e).items())


def test_copy_check_detects_swapped_gate_and_up_rows():
    sd, x = _dense(), torch.randn(5, H)
    ex = upcycle_dense(sd, n_experts=2, init="copy")
    swapped = {**ex, "gate_up_proj": torch.cat([ex["gate_up_proj"][:, I:], ex["gate_up_proj"][:, :I]], dim=1)}
    assert max_abs_diff(expert_out(swapped, 0, x), dense_mlp(sd, x)) > 1e-2


def test_split_partitions_neurons_and_experts_sum_to_dense():
    sd, x = _dense(), torch.randn(5, H)
    perm = split_permutation(I, 4, seed=3)
    assert sorted(perm.flatten().tolist()) == list(range(I))
    ex = upcycle_dense(sd, n_experts=4, init="split", split_scale=1.0, seed=3)
    assert ex["gate_up_proj"].shape == (4, 2 * I // 4, H) and ex["down_proj"].shape == (4, H, I // 4)
    assert rel_rms(sum(expert_out(ex, e, x) for e in range(4)), dense_mlp(sd, x)) < 1e-6
    # default scale E: uniform renormalised gates (1/E each) over all E experts give the dense output
    scaled = upcycle_dense(sd, n_experts=4, init="split", seed=3)
    assert rel_rms(sum(expert_out(scaled, e, x) / 4 for e in range(4)), dense_mlp(sd, x)) < 1e-6
    # non-vacuity: dropping one expert's share is a real change
    assert max_abs_diff(sum(expert_out(ex, e, x) for e in range(3)), dense_mlp(sd, x)) > 1e-2


def test_random_is_seeded_and_not_a_copy():
    sd = _dense()
    a = upcycle_dense(sd, n_experts=3, init="random", seed=1, std=0.02)
    b = upcycle_dense(sd, n_experts=3, init="random", seed=1, std=0.02)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["gate_up_proj"].std().item() == pytest.approx(0.02, rel=0.2)
    assert not torch.equal(a["down_proj"][0], sd["down_proj.weight"])


def test_bf16_copy_is_exact():
    sd = _dense(dtype=torch.bfloat16)
    ex = upcycle_dense(sd, n_experts=2, init="copy")
    assert ex["gate_up_proj"].dtype == torch.bfloat16
    assert torch.equal(ex["down_proj"][1], sd["down_proj.weight"])


@pytest.mark.parametrize(
    "change, kwargs, match",
    [
        (lambda sd: {**sd, "up_proj.bias": torch.zeros(I)}, {}, "biases are not supported"),
        (lambda sd: {k: v for k, v in sd.items() if k != "gate_proj.weight"}, {}, "missing gate_proj.weight"),
        (lambda sd: sd, {"init": "split", "n_experts": 5}, "divisible by n_experts"),
        (lambda sd: sd, {"init": "drop"}, "unknown upcycling init 'drop'"),
    ],
)
def test_bad_dense_inputs(change, kwargs, match):
    with pytest.raises(ValueError, match=match):
        upcycle_dense(change(_dense()), **{"n_experts": 4, **kwargs})
