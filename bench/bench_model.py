"""MyLLM against the Hugging Face Qwen2 model it was imported from: training and decoding throughput.

One process, the same weights (``MyLLMForCausalLM.from_hf``), sdpa attention in both, measurements interleaved
(the order alternates every repeat) and summarised by medians; the ratio is MyLLM / HF (target >= 0.95).

* train: one step = forward + backward with labels (``use_cache=False``), batch ``B x T`` -> tokens/s.
* decode: ``generate`` greedy, batch 1, a short prompt, exactly ``N`` new tokens with the default dynamic
  cache -> new tokens/s.

Both wall-clock and process CPU time are reported: on a shared machine the CPU time is the steadier measure
of per-call overhead (``--threads 1`` removes OpenMP spin/barrier noise as well).

    python bench/bench_model.py            # hidden 512, 8 layers, train 8 x 512, decode 128 tokens
    python bench/bench_model.py --quick    # the same model, train 2 x 128, decode 32 tokens, fewer repeats
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from myllm import MyLLMForCausalLM


def build_pair(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    hf = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).to(args.device)
    ours = MyLLMForCausalLM.from_hf(hf)
    return hf, ours


def train_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss = model(x, labels=x, use_cache=False).loss
        loss.backward()

    return step


def decode(model: torch.nn.Module, prompt: torch.Tensor, n_new: int) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)
        assert out.shape[1] == prompt.shape[1] + n_new

    return run


def timed(fn: Callable[[], None], device: str) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of this process)`` of one call."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(
    fns: dict[str, Callable[[], None]], repeats: int, warmup: int, device: str
) -> dict[str, tuple[float, float]]:
    """Median ``(wall, cpu)`` seconds per call of each function, calling them in alternating order."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else reversed(names):
            times[name].append(timed(fns[name], device))
    return {name: tuple(statistics.median(t[i] for t in ts) for i in range(2)) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small batch, short decode, few repeats")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=6400)
    p.add_argument("--batch", type=int, default=None, help="training batch (default 8; quick: 2)")
    p.add_argument("--seq", type=int, default=None, help="training sequence length (default 512; quick: 128)")
    p.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (default 128; quick: 32)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per model (default 5; quick: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (2 if args.quick else 8)
    seq = args.seq or (128 if args.quick else 512)
    n_new = args.new_tokens or (32 if args.quick else 128)
    repeats = args.repeats or (3 if args.quick else 5)

    hf, ours = build_pair(args)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (batch, seq), generator=g).to(args.device)
    prompt = torch.randint(0, args.vocab, (1, 16), generator=g).to(args.device)
    n_params = sum(p.numel() for p in ours.parameters())
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, device {args.device}"
    )
    print(
        f"model: Qwen2 hidden {args.hidden}, {args.layers} layers, {n_params / 1e6:.1f}M params; "
        f"load before: {os.getloadavg()[0]:.2f}"
    )

    hf.train(), ours.train()
    train = interleaved({"hf": train_step(hf, x), "myllm": train_step(ours, x)}, repeats, warmup=1, device=args.device)
    hf.eval(), ours.eval()
    dec = interleaved(
        {"hf": decode(hf, prompt, n_new), "myllm": decode(ours, prompt, n_new)}, repeats, warmup=1, device=args.device
    )

    rows = [
        (f"train fwd+bwd {batch}x{seq} tokens/s", batch * seq, train),
        (f"decode batch 1, {n_new} new tokens/s", n_new, dec),
    ]
    # wall clock is what a user sees; CPU time of this process is steadier on a shared machine
    print(f"{'measure':38s} {'clock':5s} {'HF Qwen2':>10s} {'MyLLM':>10s} {'ratio':>7s}")
    for name, tokens, t in rows:
        for i, clock in enumerate(("wall", "cpu")):
            theirs, mine = tokens / t["hf"][i], tokens / t["myllm"][i]
            print(f"{name:38s} {clock:5s} {theirs:10.1f} {mine:10.1f} {mine / theirs:7.3f}")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
