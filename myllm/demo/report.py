"""The demo's outputs: ``results.json`` (every number), ``report.md`` (the same, for people), the inputs of
``myllm plot`` (``ppl.json``, ``expert_load.json``) and the PNG plots drawn by :mod:`myllm.plots`.

Each file is written atomically; the demo writes them into its staging directory, which becomes the output
directory only when everything is there.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from myllm.data.io import atomic_path, write_json_atomic
from myllm.plots import EXPERT_LOAD_FILE, PPL_FILE, plot_expert_load, plot_loss_curves, plot_perplexity_bars

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PLOTS = {
    "loss": "loss.png",
    "loss_continued": "loss_continued.png",
    "expert_load": "expert_load.png",
    "ppl": "ppl.png",
}


class Stopwatch:
    """Wall-clock seconds per named stage (re-entering a stage adds to it); prints a header per titled stage."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str, title: str | None = None) -> Iterator[None]:
        if title:
            self.echo(f"\n== {title}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured: CPU, cores, torch threads, versions, date, load average."""
    import torch
    import transformers

    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_start": load_average(),
    }


def write_outputs(root: Path, res: dict[str, Any], *, echo: Callable[[str], None] = print) -> None:
    """Write the plots, ``ppl.json``, ``expert_load.json``, ``results.json`` and ``report.md`` into ``root``."""
    start = time.perf_counter()
    n_pre = res["loss"]["pretrain"]["steps"]
    runs = {"dense pretraining": res["loss"]["pretrain"]["history"]}
    for key, label in (("dense", "dense continued"), ("moe", "MoE continued")):
        runs[label] = [{"step": r["step"] + n_pre, "loss": r["loss"]} for r in res["loss"][key]["history"]]
    loads = {"MoE continued training": res["expert_load_training"], "held-out text": res["expert_load_heldout"]}
    write_json_atomic(root / PPL_FILE, res["ppl"])
    write_json_atomic(root / EXPERT_LOAD_FILE, loads)
    plot_loss_curves(runs, root / PLOTS["loss"], smooth=0.6, title="training loss: pretraining, then continued")
    continued = {k: v for k, v in runs.items() if k != "dense pretraining"}
    plot_loss_curves(continued, root / PLOTS["loss_continued"], smooth=0.6, title="continued training at equal steps")
    plot_expert_load(loads, root / PLOTS["expert_load"])
    plot_perplexity_bars(res["ppl"], root / PLOTS["ppl"], title="held-out perplexity and bits per byte")
    res["timing"]["report"] = time.perf_counter() - start
    res["total_seconds"] = sum(res["timing"].values())
    res["files"] = {"report": REPORT_FILE, **PLOTS}
    write_json_atomic(root / RESULTS_FILE, res)
    with atomic_path(root / REPORT_FILE) as tmp:
        tmp.write_text(render_report(res), encoding="utf-8")
    echo(f"\nwrote {REPORT_FILE}, {', '.join(PLOTS.values())} ({res['total_seconds']:.0f} s in all)")


def _mean_part(values: list[float], *, first: bool) -> float:
    """Mean of the first (or last) 10% of ``values`` (at least one); nan when empty."""
    if not values:
        return float("nan")
    n = max(1, len(values) // 10)
    part = values[:n] if first else values[-n:]
    return sum(part) / len(part)


def _fmt_loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def render_report(res: dict[str, Any]) -> str:
    """The Markdown report of a demo run's results."""
    p, c, m = res["preset"], res["corpus"], res["machine"]
    dense, moe = res["params"]["dense"], res["params"]["moe"]
    up, rl = res["upcycle"], res["reload"]
    ppl = res["ppl"]
    lines = [
        "# myllm demo report",
        "",
        f"Preset `{p['name']}`, {m['date_utc']}, {res['total_seconds']:.0f} s in all. Reproduce: "
        f"`python -m myllm demo{' --quick' if p['name'] == 'quick' else ''}`.",
        "",
        "## Data",
        "",
        f"- Corpus: docstrings of {c['files']} Python standard library source files"
        f"{' (package `' + p['corpus_package'] + '`)' if p['corpus_package'] else ''}: {c['train_docs']} train and "
        f"{c['heldout_docs']} held-out documents, {c['bytes'] / 1e6:.2f} MB of UTF-8 text.",
        f"- Tokenizer: byte-level BPE trained on the train split, {res['tokenizer']['vocab_size']} tokens "
        f"(ChatML specials {', '.join(f'`{t}`' for t in res['tokenizer']['special_tokens'])}).",
        f"- Training shards: {res['shards']['tokens']:,} tokens in {res['shards']['documents']} documents "
        "(every document ends with `<|im_end|>`).",
        f"- Held-out evaluation: {ppl['untrained']['documents']} documents, {ppl['untrained']['tokens']:,} scored "
        f"tokens, {ppl['untrained']['bytes']:,} bytes; windows of {ppl['untrained']['max_length']} tokens, stride "
        f"{ppl['untrained']['stride']}.",
        "",
        "## Models",
        "",
        "| model | parameters | active per token |",
        "| --- | ---: | ---: |",
        f"| dense MyLLM ({p['num_layers']} layers, hidden {p['hidden_size']}, FFN {p['intermediate_size']}, "
        f"{p['num_heads']} heads / {p['num_kv_heads']} KV) | {dense['total']:,} | {dense['active']:,} |",
        f"| upcycled MoE ({up['n_experts']} experts, top-{up['top_k']}, aux-loss-free balancing) | "
        f"{moe['total']:,} | {moe['active']:,} |",
        "",
        "## Training",
        "",
        f"Sequence length {p['seq_len']}, {p['micro_batch_size']} sequences per step, AdamW, cosine schedule "
        f"with {p['warmup_steps']} warmup steps. The dense model is pretrained from scratch, then a copy and the "
        "upcycled MoE continue on the same windows in the same order with the same schedule.",
        "",
        "| phase | steps | tokens | lr | first loss | last loss | mean of last 10% |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, label, lr in (
        ("pretrain", "dense pretraining", p["pretrain_lr"]),
        ("dense", "dense continued", p["continue_lr"]),
        ("moe", "MoE continued", p["continue_lr"]),
    ):
        s = res["loss"][key]
        lines.append(
            f"| {label} | {s['steps']} | {s['tokens']:,} | {lr:g} | {_fmt_loss(s['first'])} | "
            f"{_fmt_loss(s['last'])} | {_fmt_loss(s['last_mean'])} |"
        )
    lines += [
        "",
        "## Upcycling is function-preserving",
        "",
        f'`factory.replace(model, "ffn", "moe", n_experts={up["n_experts"]}, top_k={up["top_k"]}, '
        'init="copy")` on the pretrained dense model: max |logit difference| over '
        f"{up['tokens_compared']} held-out tokens = **{up['max_logit_diff']:.2e}** (float32 rounding). The same "
        f'surgery with `init="random"` (control: the check does see a change) gives '
        f"{up['control_random_init_diff']:.2f}.",
        "",
        "## Held-out perplexity",
        "",
        "| model | perplexity | bits per byte | NLL (nats/token) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, r in ppl.items():
        lines.append(f"| {label} | {r['ppl']:.2f} | {r['bits_per_byte']:.4f} | {r['nll']:.4f} |")
    d, e = ppl["dense continued"]["ppl"], ppl["MoE continued"]["ppl"]
    lines += [
        "",
        f"At equal steps the MoE's held-out perplexity is {e:.2f} against the dense model's {d:.2f} "
        f"({(e / d - 1) * 100:+.1f}%).",
        "",
        "## Save, reload, generate",
        "",
        f"The continued MoE was saved with `save_pretrained` and reloaded with "
        f"`transformers.AutoModelForCausalLM.from_pretrained` as `{rl['class']}` (model type `{rl['model_type']}`): "
        f"max |logit difference| to the in-memory model = **{rl['max_logit_diff']:.2e}** (control: against the "
        f"dense continued model {rl['control_dense_diff']:.2f}).",
        "",
        "Samples (temperature 0.8, top-p 0.95, seed 0):",
        "",
    ]
    for s in res["samples"]:
        text = (s["prompt"] + s["text"]).replace("\n", " ").replace("`", "'")
        lines.append(f"- `{text}`")
    lines += [
        "",
        "## Expert load",
        "",
        "Tokens routed to each expert (top-k picks) summed over the continued training, and on "
        f"{rl['load_tokens']:,} held-out tokens after it. MaxVio = (max - mean) / mean, 0 is perfect balance. "
        "Summed over many steps the aux-loss-free bias keeps the experts evenly used; within one batch the "
        f"worst layer's MaxVio went from {_mean_part(res['max_vio_per_step'], first=True):.2f} (mean of the first "
        f"10% of steps) to {_mean_part(res['max_vio_per_step'], first=False):.2f} (last 10%).",
        "",
        "| layer | tokens per expert (continued training) | MaxVio | held-out MaxVio |",
        "| --- | --- | ---: | ---: |",
    ]
    held = res["expert_load_heldout"]
    for layer, entry in res["expert_load_training"].items():
        h = held.get(layer, {}).get("max_vio", float("nan"))
        lines.append(f"| {layer} | {entry['tokens_per_expert']} | {entry['max_vio']:.3f} | {h:.3f} |")
    lines += [
        "",
        "## Plots",
        "",
        f"![training loss]({PLOTS['loss']})",
        "",
        f"![continued training]({PLOTS['loss_continued']})",
        "",
        f"![expert load]({PLOTS['expert_load']})",
        "",
        f"![held-out perplexity]({PLOTS['ppl']})",
        "",
        "## Timing and machine",
        "",
        "| stage | seconds |",
        "| --- | ---: |",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in res["timing"].items()]
    lines += [
        f"| total | {res['total_seconds']:.1f} |",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, {m['platform']}; Python "
        f"{m['python']}, torch {m['torch']}, transformers {m['transformers']}. Load average (1/5/15 min) at the "
        f"start {m['load_average_start']}, at the end {m.get('load_average_end')} (the machine may be shared).",
        "",
    ]
    return "\n".join(lines)
