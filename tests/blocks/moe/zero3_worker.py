"""Worker for test_zero3.py, run by ``torchrun --nproc_per_node=2`` (CPU, gloo, DeepSpeed ZeRO-3).

A tiny LM made of MoE blocks whose routing is forced by the data: rank 0's tokens go only to experts
{0, 1}, so experts 2 and 3 get no tokens there, while rank 1 uses all four. Trains 5 optimizer
steps (with aux-loss-free bias updates), then checks on every rank that the forcing held, and writes the
full (gathered) parameters and router biases of each rank to ``OUT/rank{r}.pt`` for the test to compare.

``--leaf`` additionally marks the blocks as ZeRO-3 leaf modules (DeepSpeed's own MoE recipe); without
it the blocks must be safe on their own. ``--naive`` swaps in a per-expert ModuleList MoE that skips idle experts: the negative control that
shows the forced routing really creates the ZeRO-3 hazard.
"""

from __future__ import annotations

import argparse
import json
import os

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from myllm.blocks.ffn.moe import MoE, expert_load, update_router_bias

H, E, VOCAB, LAYERS = 16, 4, 32, 2


class NaiveMoE(nn.Module):
    """Per-expert modules, idle experts skipped (the pattern that hangs ZeRO-3)."""

    is_moe = False

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(H, 8), nn.SiLU(), nn.Linear(8, H)) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, H)
        w, idx = self.gate(flat).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(flat)
        for e in range(E):
            rows, slot = torch.where(idx == e)
            if rows.numel():
                out = out.index_add(0, rows, self.experts[e](flat[rows]) * w[rows, slot, None])
        return out.view_as(x)


class TinyMoELM(nn.Module):
    def __init__(self, naive: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, H)
        kwargs = {"hidden_size": H, "n_experts": E, "top_k": 2, "intermediate_size": 8, "n_shared_experts": 1}
        self.blocks = nn.ModuleList(
            NaiveMoE() if naive else MoE(**kwargs, balance={"switch": 0.01, "loss_free": 1e-3}) for _ in range(LAYERS)
        )
        self.head = nn.Linear(H, VOCAB, bias=False)
        with torch.no_grad():
            # token t < VOCAB/2 carries +5 on coordinate 0, the others -5; routers send +0 to experts {0, 1}
            self.embed.weight.normal_(0, 0.1)
            self.embed.weight[: VOCAB // 2, 0] = 5.0
            self.embed.weight[VOCAB // 2 :, 0] = -5.0
            for block in self.blocks:
                gate = block.gate.weight
                gate.zero_()
                gate[:2, 0], gate[2:, 0] = 2.0, -2.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        logits = self.head(x)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        return loss + sum(b.aux_loss() for b in self.blocks if getattr(b, "is_moe", False))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--naive", action="store_true")
    parser.add_argument("--leaf", action="store_true", help="also mark the MoE blocks as ZeRO-3 leaf modules")
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # same initial weights on both ranks
    model = TinyMoELM(args.naive)
    if args.leaf:
        deepspeed.utils.set_z3_leaf_modules(model, [MoE])
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 64},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1000,
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    print(f"rank {rank}: deepspeed initialised, training", flush=True)
    g = torch.Generator().manual_seed(100 + rank)
    losses, idle = [], []
    for _ in range(5):
        # rank 0: both sequences from the low half (experts 0, 1 only); rank 1: one sequence from each half
        ids = torch.randint(0, VOCAB // 2, (2, 12), generator=g)
        if rank == 1:
            ids[0] += VOCAB // 2
        loss = engine(ids)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if not args.naive:
            update_router_bias(engine.module)
            loads = expert_load(engine.module)
            idle.append([[i for i, c in enumerate(v["tokens_per_expert"]) if c == 0] for v in loads.values()])
    state = {}
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        for name, p in engine.module.named_parameters():
            state[name] = p.detach().clone()
    for name, b in engine.module.named_buffers():
        if "e_score_correction_bias" in name:
            state[name] = b.detach().clone()
    os.makedirs(args.out, exist_ok=True)
    torch.save(state, os.path.join(args.out, f"rank{rank}.pt"))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": losses, "idle_experts": idle}, f)
    dist.barrier()


if __name__ == "__main__":
    main()
