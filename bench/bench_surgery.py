"""Benchmark: in-place dense -> MoE upcycling of a Qwen2.5-0.5B-shaped model vs a plain allocate + copy.

Model: hidden 896, 24 layers, intermediate 4864, 14 heads, 2 KV heads, vocab 151936, tied embeddings,
random bf16 weights. Surgery: ``factory.replace(model, "ffn", "moe", n_experts=4, top_k=2, init="copy")``
on every layer.

Each measurement runs in a fresh subprocess (so peak RSS belongs to that run alone):

* ``surgery``: build the dense model, then time the replace; report the process's peak RSS and the final
  model's size in bytes (parameters + buffers, tied tensors once).
* ``copy``: the baseline. Build the same dense model (same process state), then time allocating and
  filling, with plain ``torch.empty(n).copy_(source)``, as many bytes as the surgery writes (the new
  expert tensors), one layer-sized chunk at a time from a pre-touched contiguous source.

The two kinds alternate (interleaved) ``--repeats`` times; the report gives medians and the ratios
``time(surgery) / time(copy)`` (target <= 3) and ``peak RSS / final model bytes`` (target <= 1.2).

    python bench/bench_surgery.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHAPE = dict(
    hidden_size=896,
    num_hidden_layers=24,
    intermediate_size=4864,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
)
N_EXPERTS, TOP_K = 4, 2


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _dense_model():
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(**SHAPE)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def child(kind: str) -> dict:
    import torch

    import myllm
    from myllm import factory

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = _dense_model()
    rss_before = _peak_rss_bytes()
    if kind == "surgery":
        start = time.perf_counter()
        factory.replace(model, "ffn", "moe", n_experts=N_EXPERTS, top_k=TOP_K, init="copy")
        seconds = time.perf_counter() - start
        assert all(type(layer.mlp).__name__ == "MoE" for layer in model.model.layers)
        return {
            "kind": kind,
            "seconds": seconds,
            "peak_rss": _peak_rss_bytes(),
            "rss_before": rss_before,
            "final_bytes": _model_bytes(model),
            "myllm": myllm.__version__,
        }
    # baseline: allocate and fill, with a plain contiguous copy, the bytes the surgery writes (the new
    # expert tensors), one layer's worth at a time, from a pre-touched source of one layer's size
    per_layer = N_EXPERTS * sum(
        p.numel() for p in model.model.layers[0].mlp.parameters()
    )  # elements per layer: E x (gate + up + down)
    source = torch.ones(per_layer, dtype=torch.bfloat16)
    kept = []
    start = time.perf_counter()
    for _ in model.model.layers:
        out = torch.empty(per_layer, dtype=torch.bfloat16)
        out.copy_(source)
        kept.append(out)
    seconds = time.perf_counter() - start
    return {"kind": kind, "seconds": seconds, "bytes": sum(t.numel() * t.element_size() for t in kept)}


def run_child(kind: str) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", kind],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["surgery", "copy"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    runs: dict[str, list[dict]] = {"surgery": [], "copy": []}
    for i in range(args.repeats):
        for kind in ("surgery", "copy") if i % 2 == 0 else ("copy", "surgery"):
            runs[kind].append(run_child(kind))
            print(f"run {i} {kind}: {runs[kind][-1]['seconds']:.3f} s", flush=True)
    t_surgery = statistics.median(r["seconds"] for r in runs["surgery"])
    t_copy = statistics.median(r["seconds"] for r in runs["copy"])
    peak = statistics.median(r["peak_rss"] for r in runs["surgery"])
    final = runs["surgery"][0]["final_bytes"]
    before = statistics.median(r["rss_before"] for r in runs["surgery"])
    written = runs["copy"][0]["bytes"]
    gib = 2**30
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; load: {os.getloadavg()}")
    print(f"surgery (replace every FFN -> moe, E={N_EXPERTS}, top_k={TOP_K}, init=copy): median {t_surgery:.3f} s")
    print(f"plain torch alloc+copy of the same {written / gib:.2f} GiB: median {t_copy:.3f} s")
    print(f"time ratio surgery / copy: {t_surgery / t_copy:.2f}x (target <= 3)")
    print(
        f"peak RSS {peak / gib:.2f} GiB (dense model built: {before / gib:.2f} GiB); final model {final / gib:.2f} GiB"
    )
    print(f"peak RSS / final model bytes: {peak / final:.3f}x (target <= 1.2)")


if __name__ == "__main__":
    main()
