"""Worker for test_moe_zero3.py, run by ``torchrun --nproc_per_node=2`` (CPU, gloo, DeepSpeed ZeRO-3).

A tiny MyLLM MoE model (2 layers, ``moe`` FFNs with 4 experts, top-2, a shared expert, Switch aux loss and
aux-loss-free balancing) whose routing is forced by the data: tokens of the lower half of the vocabulary
carry +5 on hidden coordinate 0, the others -5, and every router sends +0 to experts {0, 1}, -0 to {2, 3}.
Rank 0 sees lower-half tokens only, so experts 2 and 3 get no tokens there; rank 1 sees one sequence of
each half. Trains 5 optimizer steps (with ``update_router_bias`` after each), records the idle experts per
step, and writes the gathered parameters and router biases of each rank to ``OUT/rank{r}.pt``.

``--leaf`` additionally marks the blocks as ZeRO-3 leaf modules (DeepSpeed's own MoE recipe); without it
the blocks must be safe on their own. ``--naive`` swaps in a per-expert ModuleList MoE that skips idle
experts: the negative control showing that the forced routing really creates the ZeRO-3 hazard.
"""

from __future__ import annotations

import argparse
import json
import os

import deepspeed
import torch
import torch.distributed as dist
from pydantic import PositiveInt
from torch import nn

from myllm import MyLLMConfig, MyLLMForCausalLM, blocks
from myllm.blocks.ffn.moe import MoE, expert_load, update_router_bias
from myllm.blocks.registry import BlockConfig

H, E, VOCAB = 16, 4, 32


class NaiveMoEConfig(BlockConfig):
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    n_experts: PositiveInt = E


class NaiveMoE(nn.Module):
    """Per-expert modules, idle experts skipped (the pattern that breaks ZeRO-3)."""

    def __init__(self, *, hidden_size: int, intermediate_size: int, n_experts: int = E) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden_size, n_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(
                nn.Linear(hidden_size, intermediate_size), nn.SiLU(), nn.Linear(intermediate_size, hidden_size)
            )
            for _ in range(n_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        w, idx = self.gate(flat).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(idx == e)
            if rows.numel():
                out = out.index_add(0, rows, expert(flat[rows]) * w[rows, slot, None])
        return out.view_as(x)


def build_model(naive: bool) -> MyLLMForCausalLM:
    if naive:
        blocks.register("ffn", "test_naive_moe", config=NaiveMoEConfig, example=lambda: {"hidden_size": 8})(NaiveMoE)
        ffn = {"name": "test_naive_moe", "intermediate_size": 8}
    else:
        ffn = {
            "name": "moe",
            "n_experts": E,
            "top_k": 2,
            "intermediate_size": 8,
            "n_shared_experts": 1,
            "balance": {"switch": 0.01, "loss_free": 1e-3},
        }
    config = MyLLMConfig(
        vocab_size=VOCAB,
        hidden_size=H,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        ffn=ffn,
    )
    torch.manual_seed(0)  # same initial weights on both ranks
    model = MyLLMForCausalLM(config)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.normal_(0, 0.1)
        emb[: VOCAB // 2, 0], emb[VOCAB // 2 :, 0] = 5.0, -5.0
        for layer in model.model.layers:
            gate = layer.mlp.gate.weight
            gate.zero_()
            gate[:2, 0], gate[2:, 0] = 2.0, -2.0
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--naive", action="store_true")
    parser.add_argument("--leaf", action="store_true", help="also mark the MoE blocks as ZeRO-3 leaf modules")
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    model = build_model(args.naive)
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
        # rank 0: both sequences from the lower half (experts 0, 1 only); rank 1: one sequence of each half
        ids = torch.randint(0, VOCAB // 2, (2, 12), generator=g)
        if rank == 1:
            ids[0] += VOCAB // 2
        loss = engine(input_ids=ids, labels=ids).loss
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
