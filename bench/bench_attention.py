"""Attention benchmarks: MoBA against SDPA (prefill, decode) and MLA (absorbed) against the GQA it replaces.

One process, float32 on CPU, B = 1, 8 heads, head_dim 64; each measurement interleaves the variants and
reports medians and ratios. Peak memory is the peak of bytes allocated during one call (profiler memory
events), so inputs do not count and the output does.

* Prefill: MoBA (``chunk_size=512``, ``top_k=3``) against ``scaled_dot_product_attention(is_causal=True)`` and
  against MoBA's dense reference, forward and forward+backward, at T = 4096, 8192, 16384. The reference is
  O(T^2) in memory; it is skipped where its estimate exceeds ``--ref-budget-gb``.
* Decode: one step over a 16384-token cache. MoBA kernel (with and without the block-sum memo that
  ``MobaAttention`` keeps per cache layer) against SDPA over the whole cache; an MLA block
  converted from a GQA block (``myllm.surgery.mla.to_mla``) decoding from a ``latent`` cache (absorbed
  weights) against the GQA block decoding from a ``DynamicCache``, with the KV bytes per token of each.

Usage: ``python bench/bench_attention.py [--quick] [--repeats N] [--json out.json]``. ``--quick`` uses
T = 1024, 2048 and a 4096-token cache (a smoke run; the machine is shared, so note the load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's myllm

from myllm import blocks  # noqa: E402
from myllm.blocks.attention.moba_kernels import BlockSums, moba_attention  # noqa: E402
from myllm.blocks.attention.moba_reference import moba_reference  # noqa: E402
from myllm.blocks.cache.latent import LatentCache  # noqa: E402
from myllm.surgery.mla import kv_cache_bytes_per_token, to_mla  # noqa: E402

HEADS, HEAD_DIM, CHUNK, TOP_K = 8, 64, 512, 3


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of bytes allocated (minus freed) while ``fn`` runs, from the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak


def parallel_op_probe() -> float:
    """Median microseconds of a small elementwise op (200k floats) at the current thread count.

    On an idle machine this is ~10 us; on an oversubscribed one, every parallel region can wait for a
    descheduled thread and this grows to milliseconds. Kernels made of many small calls (MoBA) suffer from
    that far more than one long call (SDPA), so the probe is recorded with the results.
    """
    x = torch.zeros(200_000)
    times = []
    for _ in range(200):
        start = time.perf_counter()
        x.add_(1.0)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def interleaved(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each variant, running them in turn ``repeats`` times after one warm-up each."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _qkv(length: int, *, grad: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(length)
    return [torch.randn(1, HEADS, length, HEAD_DIM, generator=g).requires_grad_(grad) for _ in range(3)]


def _fwd_bwd(attn: Callable, q, k, v) -> Callable[[], None]:
    def run() -> None:
        out = attn(q, k, v)
        out.backward(torch.ones_like(out))
        for x in (q, k, v):
            x.grad = None

    return run


def reference_bytes(length: int, backward: bool) -> float:
    """Rough peak of the dense reference: ~14 bytes (forward, measured) / ~26 (with backward) per [H, T, T] element."""
    return HEADS * length * length * (26 if backward else 14)


def bench_prefill(lengths: list[int], repeats: int, ref_budget: float) -> list[dict]:
    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def moba(q, k, v):
        return moba_attention(q, k, v, chunk_size=CHUNK, top_k=TOP_K)

    def reference(q, k, v):
        return moba_reference(q, k, v, chunk_size=CHUNK, top_k=TOP_K)

    rows = []
    for length in lengths:
        for backward in (False, True):
            q, k, v = _qkv(length, grad=backward)
            kernels = {"sdpa": sdpa, "moba": moba}
            skipped = reference_bytes(length, backward) > ref_budget
            if not skipped:
                kernels["reference"] = reference
            variants = {
                name: (_fwd_bwd(fn, q, k, v) if backward else (lambda fn=fn, q=q, k=k, v=v: fn(q, k, v)))
                for name, fn in kernels.items()
            }
            with torch.no_grad() if not backward else torch.enable_grad():
                seconds = interleaved(variants, repeats)
                peaks = {name: peak_bytes(fn) for name, fn in variants.items()}
            row = {
                "T": length,
                "mode": "fwd+bwd" if backward else "fwd",
                "sdpa_s": seconds["sdpa"],
                "moba_s": seconds["moba"],
                "speedup_vs_sdpa": seconds["sdpa"] / seconds["moba"],
                "sdpa_peak_mib": peaks["sdpa"] / 2**20,
                "moba_peak_mib": peaks["moba"] / 2**20,
                "peak_ratio_moba_over_sdpa": peaks["moba"] / peaks["sdpa"],
            }
            if skipped:
                row["reference"] = f"skipped (needs ~{reference_bytes(length, backward) / 2**30:.0f} GiB)"
            else:
                row.update(
                    reference_s=seconds["reference"],
                    speedup_vs_reference=seconds["reference"] / seconds["moba"],
                    reference_peak_mib=peaks["reference"] / 2**20,
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def bench_moba_decode(cache_len: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, 1, HEAD_DIM, generator=g)
    k, v = (torch.randn(1, HEADS, cache_len, HEAD_DIM, generator=g) for _ in range(2))
    memo = BlockSums()  # steady-state decoding: past block sums are remembered (as MobaAttention does)
    with torch.no_grad():
        seconds = interleaved(
            {
                "full": lambda: F.scaled_dot_product_attention(q, k, v),
                "moba": lambda: moba_attention(q, k, v, chunk_size=CHUNK, top_k=TOP_K, block_sums=memo),
                "moba_no_memo": lambda: moba_attention(q, k, v, chunk_size=CHUNK, top_k=TOP_K),
            },
            repeats,
        )
    row = {"cache": cache_len, "full_s": seconds["full"], "moba_s": seconds["moba"]}
    row["speedup"] = seconds["full"] / seconds["moba"]
    row["moba_no_memo_s"] = seconds["moba_no_memo"]
    print(json.dumps(row), flush=True)
    return row


# GQA block that MLA replaces, and the MLA conversion: 4x smaller cache
GQA = {"hidden_size": 512, "num_heads": HEADS, "num_kv_heads": 4, "head_dim": HEAD_DIM}
MLA = {"kv_lora_rank": 96, "rope_dims": 8}


def bench_mla_decode(cache_len: int, repeats: int) -> dict:
    torch.manual_seed(0)
    gqa = blocks.build("attention", "sdpa", **GQA).eval()
    mla = to_mla(gqa, **MLA).eval()
    prefix = torch.randn(1, cache_len, GQA["hidden_size"])
    step = torch.randn(1, 1, GQA["hidden_size"])
    position = torch.tensor([[cache_len]])
    caches = {}
    with torch.no_grad():
        for name, module, cache in (("gqa", gqa, blocks.build("cache", "dynamic")), ("mla", mla, LatentCache())):
            for start in range(0, cache_len, 1024):  # fill the cache in chunks (MLA prefill uses SDPA)
                ids = torch.arange(start, min(start + 1024, cache_len))[None]
                module(prefix[:, ids[0]], cache=cache, position_ids=ids, attention_mask=_chunk_mask(ids, start))
            caches[name] = cache

        def decode(module, cache):
            def run():
                module(step, cache=cache, position_ids=position)
                cache.crop(-1)  # drop the step: the cache stays at cache_len tokens between repeats

            return run

        seconds = interleaved({name: decode(m, caches[name]) for name, m in (("gqa", gqa), ("mla", mla))}, repeats)
    row = {
        "cache": cache_len,
        "gqa": GQA,
        "mla": MLA,
        "gqa_s": seconds["gqa"],
        "mla_s": seconds["mla"],
        "speedup": seconds["gqa"] / seconds["mla"],
        "gqa_kv_bytes_per_token": kv_cache_bytes_per_token(gqa),
        "mla_kv_bytes_per_token": kv_cache_bytes_per_token(mla),
        "measured_cache_bytes_per_token": {n: _cache_bytes(c) for n, c in caches.items()},
    }
    row["kv_reduction"] = row["gqa_kv_bytes_per_token"] / row["mla_kv_bytes_per_token"]
    print(json.dumps(row), flush=True)
    return row


def _chunk_mask(ids: torch.Tensor, start: int) -> torch.Tensor | None:
    """Causal mask of a chunk of queries after ``start`` cached tokens (None for the first chunk)."""
    if start == 0:
        return None
    q_pos = ids[0][:, None]
    return (q_pos >= torch.arange(int(ids[0, -1]) + 1)[None, :])[None, None]


def _cache_bytes(cache) -> int:
    layer = cache.layers[0]
    return sum(t.shape[1] * t.shape[3] * t.element_size() for t in (layer.keys, layer.values))


def markdown(results: dict) -> str:
    """The results as Markdown tables (what BENCHMARKS.md records)."""
    meta = results["meta"]
    lines = [
        f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), load "
        f"{meta['load_before'][0]:.1f} before / {meta['load_after'][0]:.1f} after, small-op probe "
        f"{meta['parallel_op_probe_us']:.0f} / {meta['parallel_op_probe_us_after']:.0f} us; `{meta['command']}`",
        "",
        "| T | pass | SDPA s | MoBA s | MoBA speed-up | reference s | vs reference | SDPA peak MiB | MoBA peak MiB "
        "| peak ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["prefill"]:
        ref = (
            (f"{r['reference_s']:.3f} | {r['speedup_vs_reference']:.1f}x")
            if "reference_s" in r
            else (f"{r['reference']} | -")
        )
        lines.append(
            f"| {r['T']} | {r['mode']} | {r['sdpa_s']:.3f} | {r['moba_s']:.3f} | **{r['speedup_vs_sdpa']:.2f}x** | "
            f"{ref} | {r['sdpa_peak_mib']:.1f} | {r['moba_peak_mib']:.1f} | {r['peak_ratio_moba_over_sdpa']:.2f} |"
        )
    d, m = results["moba_decode"], results["mla_decode"]
    lines += [
        "",
        f"| decode step, cache {d['cache']} | baseline ms | ms | speed-up | KV bytes/token (layer) |",
        "|---|---|---|---|---|",
        f"| MoBA vs SDPA over the cache | {d['full_s'] * 1e3:.2f} | {d['moba_s'] * 1e3:.2f} (no memo "
        f"{d['moba_no_memo_s'] * 1e3:.2f}) | **{d['speedup']:.2f}x** | same |",
        f"| MLA (absorbed, kv_lora_rank {m['mla']['kv_lora_rank']}, rope_dims {m['mla']['rope_dims']}) vs GQA "
        f"({m['gqa']['num_heads']} heads, {m['gqa']['num_kv_heads']} kv heads of {m['gqa']['head_dim']}, hidden "
        f"{m['gqa']['hidden_size']}) | {m['gqa_s'] * 1e3:.2f} | {m['mla_s'] * 1e3:.2f} | "
        f"**{m['speedup']:.2f}x** | {m['gqa_kv_bytes_per_token']} -> {m['mla_kv_bytes_per_token']} "
        f"(**{m['kv_reduction']:.1f}x** smaller) |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 3, quick 2)")
    parser.add_argument("--ref-budget-gb", type=float, default=4.0, help="skip the dense reference above this")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 3)
    lengths = [1024, 2048] if args.quick else [4096, 8192, 16384]
    cache_len = 4096 if args.quick else 16384
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_before": os.getloadavg(),
        "parallel_op_probe_us": parallel_op_probe(),
        "command": " ".join(["python", "bench/bench_attention.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    print(json.dumps(meta), flush=True)
    results = {
        "meta": meta,
        "prefill": bench_prefill(lengths, repeats, args.ref_budget_gb * 2**30),
        "moba_decode": bench_moba_decode(cache_len, max(repeats, 5)),
        "mla_decode": bench_mla_decode(cache_len, max(repeats, 5)),
    }
    meta["load_after"] = os.getloadavg()
    meta["parallel_op_probe_us_after"] = parallel_op_probe()
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
