"""Benchmark: the ``moe`` block vs HF ``Qwen2MoeSparseMoeBlock`` vs the dense floor (CPU, float32, fwd+bwd).

For each shape (E experts, top-k K) every contender gets the same weights and the same input
``x [1, T, H]`` (requires grad, as inside a model) and runs forward + backward of ``(y * g).sum()``:

- ``dense``: SwiGLU with intermediate ``K * I + I_shared`` (the same active FLOPs): the practical floor;
- ``ours``: ``myllm`` ``moe`` block built from the HF config through ``myllm.blocks.ffn.moe.hf``;
- ``hf-eager`` / ``hf-grouped_mm``: HF's block with ``experts_implementation`` ``eager`` / ``grouped_mm``.

The block has one shared expert of size ``I_shared`` (Qwen2-MoE's block always has one; default: the
routed expert size, DeepSeek style). Runs are interleaved (dense, ours, hf-eager, hf-grouped_mm, dense,
...) and medians reported with ratios to the floor, of wall time and of process CPU time (all threads; less
sensitive to other processes on a shared machine, though OpenMP spin-waiting counts in it). Peak memory: the largest total size of live tensors
created during one forward+backward (weights excluded, gradients included), tracked per storage.

    python bench/bench_moe.py                       # T=4096, H=512, I=256, shapes 8x2 and 64x8
    python bench/bench_moe.py --shapes 8x2 --reps 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from myllm.blocks.ffn.dense import DenseFFN
from myllm.blocks.ffn.moe import MoE
from myllm.blocks.ffn.moe.hf import moe_kwargs_from_hf, moe_state_dict_from_hf


class PeakTensorMemory(TorchDispatchMode):
    """Tracks the peak total bytes of live CPU tensor storages created inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


def _init_(module: torch.nn.Module, seed: int) -> None:
    """HF-like init (normal, std 0.02) for every parameter, routers included (HF leaves them at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build(n_experts: int, top_k: int, hidden: int, inter: int, shared: int) -> dict[str, torch.nn.Module]:
    def hf_block(impl: str) -> Qwen2MoeSparseMoeBlock:
        cfg = Qwen2MoeConfig(
            hidden_size=hidden,
            num_experts=n_experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=inter,
            shared_expert_intermediate_size=shared,
            norm_topk_prob=False,
            experts_implementation=impl,
        )
        return Qwen2MoeSparseMoeBlock(cfg)

    hf_eager, hf_grouped = hf_block("eager"), hf_block("grouped_mm")
    _init_(hf_eager, seed=0)
    hf_grouped.load_state_dict(hf_eager.state_dict())
    cfg = hf_eager.experts.config
    ours = MoE(**moe_kwargs_from_hf(cfg))
    ours.load_state_dict(moe_state_dict_from_hf(cfg.model_type, hf_eager.state_dict()))
    dense = DenseFFN(hidden_size=hidden, intermediate_size=top_k * inter + shared)
    _init_(dense, seed=1)
    return {"dense": dense, "ours": ours, "hf-eager": hf_eager, "hf-grouped_mm": hf_grouped}


def step_fn(module: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        (module(x) * upstream).sum().backward()

    return step


def run_shape(args: argparse.Namespace, n_experts: int, top_k: int) -> list[dict]:
    torch.manual_seed(0)
    modules = build(n_experts, top_k, args.hidden, args.inter, args.shared or args.inter)
    x = torch.randn(1, args.tokens, args.hidden, requires_grad=True)
    upstream = torch.randn(1, args.tokens, args.hidden)
    # same function check (the floor is a different function)
    with torch.no_grad():
        ref = modules["hf-eager"](x)
        for name in ("ours", "hf-grouped_mm"):
            diff = (modules[name](x) - ref).abs().max().item()
            assert diff < 1e-4, f"{name} differs from hf-eager by {diff}"
    steps = {name: step_fn(m.train(), x, upstream) for name, m in modules.items()}
    peaks = {}
    for name, step in steps.items():
        step()  # warm-up
        with PeakTensorMemory() as mem:
            step()
        peaks[name] = mem.peak
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.reps):
        for name, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    floor, cpu_floor = statistics.median(wall["dense"]), statistics.median(cpu["dense"])
    return [
        {
            "shape": f"E={n_experts}, k={top_k}",
            "name": name,
            "median_ms": 1e3 * statistics.median(wall[name]),
            "ratio": statistics.median(wall[name]) / floor,
            "cpu_ratio": statistics.median(cpu[name]) / cpu_floor,
            "peak_mib": peaks[name] / 2**20,
        }
        for name in steps
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=256)
    parser.add_argument("--shared", type=int, default=0, help="shared expert size (default: --inter)")
    parser.add_argument("--shapes", default="8x2,64x8", help="comma-separated EXk pairs")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads; load before: {os.getloadavg()[0]:.2f}"
    )
    print(f"# T={args.tokens}, H={args.hidden}, I={args.inter}, shared={args.shared or args.inter}, reps={args.reps}")
    print("| shape | contender | median wall ms | x dense floor (wall) | x dense floor (CPU time) | peak tensor MiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for shape in args.shapes.split(","):
        n_experts, top_k = (int(v) for v in shape.lower().split("x"))
        for row in run_shape(args, n_experts, top_k):
            print(
                f"| {row['shape']} | {row['name']} | {row['median_ms']:.1f} | {row['ratio']:.2f} "
                f"| {row['cpu_ratio']:.2f} | {row['peak_mib']:.0f} |"
            )
    print(f"# load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
