"""``expert_load`` (tokens per expert, MaxVio) and ``update_router_bias`` across a model."""

from __future__ import annotations

import torch
from torch import nn

from myllm.blocks.ffn.moe import CoE, MoE, expert_load, update_router_bias
from myllm.blocks.ffn.moe.balance import max_vio

KW = {"hidden_size": 16, "n_experts": 4, "top_k": 2, "intermediate_size": 8}


def test_expert_load_per_layer():
    model = nn.ModuleDict({"a": MoE(**KW), "b": CoE(**KW, n_iterations=2), "idle": MoE(**KW)})
    x = torch.randn(3, 5, 16)
    model["a"](x)
    model["b"](x)
    stats = expert_load(model)
    assert set(stats) == {"a", "b"}  # layers that have not run are omitted
    a = stats["a"]
    assert sum(a["tokens_per_expert"]) == 3 * 5 * 2
    route = model["a"].records[-1].route
    assert a["tokens_per_expert"] == torch.bincount(route.indices.reshape(-1), minlength=4).tolist()
    loads = torch.tensor(a["tokens_per_expert"], dtype=torch.float64)
    assert abs(a["max_vio"] - float((loads.max() - loads.mean()) / loads.mean())) < 1e-12
    b = stats["b"]
    assert len(b["per_step"]) == 2 and sum(b["tokens_per_expert"]) == 2 * 3 * 5 * 2
    assert [sum(s["tokens_per_expert"]) for s in b["per_step"]] == [30, 30]


def test_max_vio_values():
    assert max_vio(torch.tensor([5, 5, 5, 5])) == 0.0
    assert max_vio(torch.tensor([0, 0, 0, 0])) == 0.0
    assert abs(max_vio(torch.tensor([8, 0, 0, 0])) - 3.0) < 1e-12


def test_update_router_bias_touches_only_loss_free_routers():
    model = nn.ModuleList(
        [
            MoE(**KW, balance={"loss_free": 0.1}),
            MoE(**KW, score_correction_bias=True),  # DeepSeek-style inference bias, never updated
            CoE(**KW, n_iterations=2, balance={"loss_free": 0.1}),
        ]
    ).train()
    with torch.no_grad():
        for m in model:
            for gate in m.gates if isinstance(m, CoE) else [m.gate]:
                gate.weight[1] += 1.0  # with inputs of positive mean: skew towards expert 1
    x = torch.randn(4, 8, 16) + 1.0
    for m in model:
        m(x)
    update_router_bias(model)
    assert model[0].gate.e_score_correction_bias[1] < 0
    assert model[1].gate.e_score_correction_bias.abs().sum() == 0
    assert all(g.e_score_correction_bias[1] < 0 for g in model[2].gates)
    assert model[0].gate.load_since_update.sum() == 0
    update_router_bias(nn.Linear(2, 2))  # no MoE at all: nothing to do
