"""What converting trained attention to MLA or MoBA costs in held-out perplexity, before and after healing.

Trains a small dense MyLLM (MHA) on the stdlib-docstring demo corpus with myllm's own training loop, then for
every variant: load the dense model, convert its attention with ``myllm.factory.replace``, measure held-out
perplexity (``myllm.eval.perplexity``, the same disjoint windows of ``seq_len`` tokens for every variant), heal
it with a short finetune through the same training loop, and measure again. The dense model continued for the
same healing steps is the control, so every healed ratio is given against it as well as against the original.

Variants: MLA at 2x and 4x KV-cache reduction (``kv_lora_rank + num_kv_heads * rope_dims`` elements per token
and layer against ``2 * num_kv_heads * head_dim``), MoBA at 4x and 8x sparsity (``top_k * chunk_size`` keys
against ``seq_len``), a full-rank MLA sanity row (must equal the dense model), and the levers the library offers
(calibration-guided MLA factorisation, other ``rope_dims``, MoBA with the last layer kept on full attention).

The docstrings are short, so consecutive ones are joined (``\\n\\n``) into long documents: training windows and
the held-out windows then span ``seq_len`` real positions and attention has long context to use.

    python examples/attention_quality.py --quick          # tiny sizes, seconds (what tests/examples runs)
    python examples/attention_quality.py --out runs/aq    # the BENCHMARKS.md numbers (2 CPU cores: ~25 min
                                                          # quiet, ~55 min at load 5)
    python examples/attention_quality.py --reuse-dense --out runs/aq   # variants again on the same dense model

Writes ``attention_quality.md`` (tables) and ``attention_quality.json`` (everything) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from _common import Data, prepare_data

from myllm import factory
from myllm.data import load_tokenizer
from myllm.eval.perplexity import perplexity
from myllm.surgery.mla import collect_attention_inputs, kv_cache_bytes_per_token
from myllm.train import Trainer, parse_config, train


@dataclass(frozen=True)
class Sizes:
    """Model, training and conversion sizes of one form (quick or full)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    seq_len: int
    steps: int
    micro_batch_size: int
    lr: float
    warmup_steps: int
    heal_steps: int
    long_heal_steps: int  # a lever: healing 10x longer
    long_heal_rope_dims: int  # ... of MLA 4x with these rope_dims (besides the main rope_dims) and MoBA 4x
    heal_lr: float  # constant; the pretraining schedule's final lr (lr * min_lr_ratio 0.1)
    rope_dims: int  # MLA: dims per kv head that keep RoPE (the main rows)
    lever_mla: tuple[tuple[int, int], ...]  # other (KV reduction factor, rope_dims) tried
    chunk_size: int  # MoBA
    doc_chars: int  # consecutive docstrings are joined into documents of at least this many characters
    eval_windows: int | None  # held-out windows (None: all that fit)
    eval_every: int  # held-out perplexity during pretraining every this many steps
    calibration_windows: int


FULL = Sizes(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    head_dim=32,
    vocab_size=2048,
    seq_len=1024,
    steps=300,
    micro_batch_size=2,
    lr=1e-3,
    warmup_steps=15,
    heal_steps=3,
    long_heal_steps=30,
    long_heal_rope_dims=12,
    heal_lr=1e-4,
    rope_dims=4,
    lever_mla=((4, 2), (4, 8), (4, 12), (2, 8), (2, 16)),
    chunk_size=64,
    doc_chars=16000,
    eval_windows=24,
    eval_every=100,
    calibration_windows=4,
)
QUICK = Sizes(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=8,
    vocab_size=384,
    seq_len=128,
    steps=12,
    micro_batch_size=2,
    lr=3e-3,
    warmup_steps=2,
    heal_steps=2,
    long_heal_steps=4,
    long_heal_rope_dims=0,
    heal_lr=3e-4,
    rope_dims=2,
    lever_mla=((4, 0), (2, 4)),
    chunk_size=8,
    doc_chars=2000,
    eval_windows=6,
    eval_every=6,
    calibration_windows=2,
)


PRETRAIN_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "seq_len",
    "steps",
    "micro_batch_size",
    "lr",
    "warmup_steps",
    "doc_chars",
    "eval_windows",
    "eval_every",
)
"""The sizes the pretrained dense model (and its curve) depend on: ``--reuse-dense`` needs them unchanged."""


@dataclass(frozen=True)
class Variant:
    """One conversion: ``replace(model, "attention", block, layers=layers, **kwargs)``."""

    name: str
    block: str
    kwargs: dict[str, Any]
    group: str  # "main", "lever" or "sanity"
    layers: tuple[int, ...] | None = None
    calibrate: bool = False
    heal: bool = True
    heal_steps: int | None = None  # None: Sizes.heal_steps


def variants(s: Sizes) -> list[Variant]:
    """The main rows, the sanity row and the levers for sizes ``s``."""
    kv_elems = 2 * s.num_key_value_heads * s.head_dim  # per token and layer

    def mla(factor: int, rope: int, group: str, calibrate: bool = False) -> Variant:
        rank = kv_elems // factor - s.num_key_value_heads * rope
        tag = f"mla {factor}x (r={rank}, rope_dims={rope}{', calibrated' if calibrate else ''})"
        return Variant(tag, "mla", {"kv_lora_rank": rank, "rope_dims": rope}, group, calibrate=calibrate)

    def moba(factor: int, group: str, layers: tuple[int, ...] | None = None) -> Variant:
        top_k = s.seq_len // (factor * s.chunk_size)
        tag = f"moba {factor}x (chunk={s.chunk_size}, top_k={top_k})"
        if layers is not None:
            tag += f", last {s.num_hidden_layers - len(layers)} layer(s) full"
        return Variant(tag, "moba", {"chunk_size": s.chunk_size, "top_k": top_k}, group, layers=layers)

    def full_rank(rope: int) -> int:  # the rank bound of the joint [K_nope; V] rows (no biases here)
        return min(s.num_key_value_heads * (2 * s.head_dim - rope), s.hidden_size)

    sparse = tuple(range(s.num_hidden_layers - 1))
    return [
        Variant(
            f"mla full rank (r={full_rank(s.head_dim)}, rope_dims={s.head_dim})",
            "mla",
            {"kv_lora_rank": full_rank(s.head_dim), "rope_dims": s.head_dim},
            "sanity",
            heal=False,
        ),
        mla(2, s.rope_dims, "main"),
        mla(4, s.rope_dims, "main"),
        moba(4, "main"),
        moba(8, "main"),
        mla(4, s.rope_dims, "lever", calibrate=True),
        *(mla(f, r, "lever") for f, r in s.lever_mla),
        Variant(  # partial RoPE alone: the low-rank step at full rank changes nothing
            f"mla partial RoPE only (r={full_rank(s.rope_dims)}, rope_dims={s.rope_dims})",
            "mla",
            {"kv_lora_rank": full_rank(s.rope_dims), "rope_dims": s.rope_dims},
            "lever",
        ),
        moba(4, "lever", layers=sparse),
        *(
            replace(v, name=f"{v.name}, healed {s.long_heal_steps} steps", heal_steps=s.long_heal_steps)
            for v in (mla(4, s.rope_dims, "lever"), mla(4, s.long_heal_rope_dims, "lever"), moba(4, "lever"))
        ),
    ]


# ---------------------------------------------------------------------------------------------------- data
def long_documents(texts: list[str], min_chars: int) -> list[str]:
    """Consecutive documents joined with a blank line into documents of at least ``min_chars`` characters."""
    out, current, n = [], [], 0
    for text in texts:
        current.append(text)
        n += len(text)
        if n >= min_chars:
            out.append("\n\n".join(current))
            current, n = [], 0
    if current:
        out.append("\n\n".join(current))
    return out


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line]


def heldout_text(data: Data, tokenizer: Any, s: Sizes) -> tuple[str, int]:
    """The held-out split as one document cut to exactly ``k * seq_len + 1`` tokens: ``k`` full windows."""
    text = "\n\n".join(read_texts(data.heldout))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    k = (len(enc["input_ids"]) - 1) // s.seq_len
    if s.eval_windows is not None:
        k = min(k, s.eval_windows)
    if k < 1:
        raise ValueError(f"the held-out split has fewer than {s.seq_len + 1} tokens")
    n = k * s.seq_len + 1
    cut = enc["offset_mapping"][n][0] if n < len(enc["input_ids"]) else len(text)
    return text[:cut], k


# ------------------------------------------------------------------------------------------------ training
def run_config(out: Path, model: dict[str, Any], data: Data, train_file: Path, s: Sizes, **train: Any) -> Any:
    """A pretraining run config of the training loop; ``train`` overrides steps, lr, schedule, seed."""
    return parse_config(
        {
            "output_dir": str(out),
            "model": {**model, "tokenizer": str(data.tokenizer)},
            "data": {"path": str(train_file), "seq_len": s.seq_len},
            "optimizer": {"lr": train["lr"], "weight_decay": 0.1},
            "schedule": train["schedule"],
            "train": {"max_steps": train["steps"], "micro_batch_size": s.micro_batch_size, "seed": train["seed"]},
            "logging": {"every": train.get("log_every", 1), "progress": False},
            "checkpoint": {"resume": "never", "save_final": True},
        }
    )


def pretrain(out: Path, data: Data, train_file: Path, s: Sizes, evaluate: Any) -> tuple[Path, dict[str, Any]]:
    """Train the dense model; returns its final directory and the loss curve (train loss per bucket of
    steps, held-out perplexity every ``eval_every`` steps)."""
    model = {
        "config": {
            "model_type": "myllm",
            "vocab_size": s.vocab_size,
            "hidden_size": s.hidden_size,
            "intermediate_size": s.intermediate_size,
            "num_hidden_layers": s.num_hidden_layers,
            "num_attention_heads": s.num_attention_heads,
            "num_key_value_heads": s.num_key_value_heads,
            "head_dim": s.head_dim,
            "max_position_embeddings": s.seq_len,
            "tie_word_embeddings": True,
        }
    }
    schedule = {"kind": "cosine", "warmup_steps": s.warmup_steps, "min_lr_ratio": 0.1}
    cfg = run_config(out, model, data, train_file, s, steps=s.steps, lr=s.lr, schedule=schedule, seed=0)
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    heldout = []
    while trainer.step < s.steps:
        trainer.fit(steps=min(s.eval_every, s.steps - trainer.step))
        heldout.append({"step": trainer.step, "ppl": evaluate(trainer.module.model)["ppl"]})
        print(
            f"  step {trainer.step}: train loss {trainer.history[-1]['loss']:.4f}, held-out ppl {heldout[-1]['ppl']:.3f}"
        )
    seconds = time.perf_counter() - t0
    result = trainer.export()
    losses = [r["loss"] for r in trainer.history]
    bucket = max(1, s.steps // 10)
    curve = [
        {"steps": f"{i + 1}-{min(i + bucket, len(losses))}", "train_loss": sum(chunk) / len(chunk)}
        for i in range(0, len(losses), bucket)
        if (chunk := losses[i : i + bucket])
    ]
    tokens = s.steps * s.micro_batch_size * s.seq_len
    record = {"train_loss": curve, "heldout": heldout, "seconds": seconds, "tokens": tokens, "sizes": asdict(s)}
    (out / "curve.json").write_text(json.dumps(record, indent=2) + "\n")
    return result.final_dir, record


def reusable_dense(out: Path, s: Sizes) -> tuple[Path, dict[str, Any]] | None:
    """A dense model a previous run of the same sizes left in ``out`` (``--reuse-dense``), else ``None``."""
    curve = out / "curve.json"
    if not ((out / "final" / "config.json").is_file() and curve.is_file()):
        return None
    record = json.loads(curve.read_text())
    saved, now = record.get("sizes", {}), json.loads(json.dumps(asdict(s)))
    same = all(saved.get(k) == now[k] for k in PRETRAIN_FIELDS)
    return (out / "final", record) if same else None


def heal(model_dir: Path, out: Path, data: Data, train_file: Path, s: Sizes, steps: int) -> tuple[Path, list[float]]:
    """Continue ``model_dir`` for ``steps`` at a constant ``heal_lr`` (same data order for every variant)."""
    schedule = {"kind": "constant", "warmup_steps": 0}
    cfg = run_config(
        out, {"path": str(model_dir)}, data, train_file, s, steps=steps, lr=s.heal_lr, schedule=schedule, seed=1
    )
    result = train(cfg)
    return result.final_dir, [r["loss"] for r in result.history]


# ---------------------------------------------------------------------------------------------- conversion
def load(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def kv_bytes(model: torch.nn.Module) -> int:
    """KV-cache bytes per token over all layers (float32), as the conversion reports them per layer."""
    return sum(kv_cache_bytes_per_token(layer.self_attn) for layer in model.model.layers)


def calibration_batches(train_file: Path, tokenizer: Any, s: Sizes) -> list[dict[str, torch.Tensor]]:
    """``calibration_windows`` windows of ``seq_len`` tokens from the training split (never held-out text)."""
    ids: list[int] = []
    for text in read_texts(train_file):
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= s.calibration_windows * s.seq_len:
            break
    n = len(ids) // s.seq_len
    return [{"input_ids": torch.tensor([ids[i * s.seq_len : (i + 1) * s.seq_len]])} for i in range(n)]


def convert(dense_dir: Path, v: Variant, calib: list[dict[str, torch.Tensor]]) -> tuple[torch.nn.Module, int, int]:
    """The dense model converted by ``v``; with KV bytes per token before and after."""
    model = load(dense_dir)
    before = kv_bytes(model)
    kwargs = dict(v.kwargs)
    if v.calibrate:
        attn = [layer.self_attn for layer in model.model.layers]
        kwargs["calibration"] = collect_attention_inputs(model, attn, calib, max_tokens=len(calib) * 1024)
    factory.replace(model, "attention", v.block, layers=list(v.layers) if v.layers is not None else None, **kwargs)
    return model, before, kv_bytes(model)


# ------------------------------------------------------------------------------------------------- report
def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """The tables of the report."""
    dense, control = report["dense"]["ppl"], report["dense_healed"]["ppl"]
    s = report["sizes"]
    lines = [
        f"Held-out perplexity at seq_len {s['seq_len']} ({report['eval']['windows']} windows, "
        f"{report['eval']['tokens']} scored tokens). Dense: {dense:.3f}; dense continued {s['heal_steps']} steps "
        f"(control): {control:.3f}. Healing: {s['heal_steps']} steps = "
        f"{100 * s['heal_steps'] / s['steps']:.1f}% of the {s['steps']} pretraining steps, lr {s['heal_lr']} constant"
        " (rows marked 'healed N steps' heal longer; their control is the dense model continued N steps: "
        + ", ".join(f"{c['steps']} steps {c['ppl']:.3f}" for c in report["dense_controls"])
        + ").",
        "",
        "| variant | group | KV bytes/token (all layers) | keys attended | ppl after conversion | ratio | "
        "ppl healed | ratio vs dense | ratio vs dense healed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        healed = r.get("ppl_healed")
        lines.append(
            f"| {r['name']} | {r['group']} | {r['kv_bytes_before']} -> {r['kv_bytes_after']} "
            f"({r['kv_bytes_before'] / r['kv_bytes_after']:.2f}x) | {r['keys_attended']} | {_f(r['ppl'])} | "
            f"{_f(r['ratio'], 4)} | {_f(healed)} | {_f(r.get('ratio_healed_vs_dense'), 4)} | "
            f"{_f(r.get('ratio_healed_vs_control'), 4)} |"
        )
    lines += ["", "Targets (issue 5):", ""]
    lines += [
        f"- {t['what']}: {_f(t['value'], 4)} (target <= {t['target']}) -> {t['verdict']}" for t in report["targets"]
    ]
    lines += ["", "Pretraining curve (mean train loss per bucket of steps; held-out ppl at seq_len):", ""]
    lines.append("| steps | train loss |")
    lines.append("|---|---|")
    lines += [f"| {c['steps']} | {c['train_loss']:.4f} |" for c in report["pretrain"]["train_loss"]]
    lines += ["", "| step | held-out ppl |", "|---|---|"]
    lines += [f"| {h['step']} | {h['ppl']:.3f} |" for h in report["pretrain"]["heldout"]]
    return "\n".join(lines) + "\n"


def targets(rows: list[dict[str, Any]], s: Sizes) -> list[dict[str, Any]]:
    """Issue 5's targets, each checked against the main rows (healed: against the dense control)."""
    by_name = {r["name"]: r for r in rows if r["group"] == "main"}
    mla4 = next(r for n, r in by_name.items() if n.startswith("mla 4x"))
    moba4 = next(r for n, r in by_name.items() if n.startswith("moba 4x"))
    checks = [
        ("MLA 4x training-free ppl ratio", mla4["ratio"], 1.25),
        ("MLA 4x healed ppl ratio vs dense healed", mla4["ratio_healed_vs_control"], 1.05),
        ("MLA 4x healed ppl ratio vs dense", mla4["ratio_healed_vs_dense"], 1.05),
        ("MoBA 4x healed ppl ratio vs dense healed", moba4["ratio_healed_vs_control"], 1.03),
        ("MoBA 4x healed ppl ratio vs dense", moba4["ratio_healed_vs_dense"], 1.03),
    ]
    return [{"what": w, "value": v, "target": t, "verdict": "met" if v <= t else "NOT met"} for w, v, t in checks]


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and a few steps (seconds)")
    p.add_argument("--out", default="runs/attention_quality", help="output directory")
    p.add_argument(
        "--reuse-dense",
        action="store_true",
        help="reuse the dense model a previous run with the same sizes left in OUT (its work/dense folder; skips pretraining)",
    )
    args = p.parse_args()
    s = QUICK if args.quick else FULL
    transformers.utils.logging.disable_progress_bar()
    out = Path(args.out)
    work = out / "work"
    for old in work.iterdir() if work.is_dir() else []:
        if not (args.reuse_dense and old.name == "dense"):
            shutil.rmtree(old)
    t_start = time.perf_counter()
    started = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load": load_average()}

    data = prepare_data(out, quick=args.quick, vocab_size=s.vocab_size)
    tokenizer = load_tokenizer(data.tokenizer)
    train_file = out / "data" / "train_long.jsonl"
    with open(train_file, "w", encoding="utf-8") as f:
        for text in long_documents(read_texts(data.train), s.doc_chars):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    text, n_windows = heldout_text(data, tokenizer, s)

    def evaluate(model: torch.nn.Module) -> dict[str, Any]:
        return perplexity(model, tokenizer, [text], max_length=s.seq_len, stride=s.seq_len, batch_size=4)

    reused = reusable_dense(work / "dense", s) if args.reuse_dense else None
    if reused is not None:
        print(f"reusing the dense model in {work / 'dense'}")
        dense_dir, curve = reused
    else:
        shutil.rmtree(work / "dense", ignore_errors=True)
        print(f"pretraining the dense model ({s.steps} steps of {s.micro_batch_size} x {s.seq_len} tokens)")
        dense_dir, curve = pretrain(work / "dense", data, train_file, s, evaluate)
    dense_eval = evaluate(load(dense_dir))
    controls: dict[int, dict[str, Any]] = {}  # healing steps -> the dense model continued as long

    def control_for(steps: int) -> float:
        if steps not in controls:
            control_dir, losses = heal(dense_dir, work / f"dense-healed-{steps}", data, train_file, s, steps)
            controls[steps] = {"steps": steps, "ppl": evaluate(load(control_dir))["ppl"], "heal_losses": losses}
            print(f"dense ppl {dense_eval['ppl']:.4f}; dense continued {steps} steps {controls[steps]['ppl']:.4f}")
        return controls[steps]["ppl"]

    control_for(s.heal_steps)
    calib = calibration_batches(train_file, tokenizer, s)

    rows = []
    for i, v in enumerate(variants(s)):
        t0 = time.perf_counter()
        model, before, after = convert(dense_dir, v, calib)
        row: dict[str, Any] = {
            "name": v.name,
            "group": v.group,
            "block": v.block,
            "kwargs": v.kwargs,
            "layers": list(v.layers) if v.layers is not None else "all",
            "calibrated": v.calibrate,
            "kv_bytes_before": before,
            "kv_bytes_after": after,
            "keys_attended": (
                f"{v.kwargs['top_k'] * v.kwargs['chunk_size']}/{s.seq_len}" if v.block == "moba" else "all"
            ),
        }
        row["ppl"] = evaluate(model)["ppl"]
        row["ratio"] = row["ppl"] / dense_eval["ppl"]
        if v.heal:
            conv_dir = work / f"variant{i}"
            model.save_pretrained(conv_dir / "converted")
            steps = v.heal_steps or s.heal_steps
            healed_dir, losses = heal(conv_dir / "converted", conv_dir / "heal", data, train_file, s, steps)
            row["heal_steps"] = steps
            row["ppl_healed"] = evaluate(load(healed_dir))["ppl"]
            row["ratio_healed_vs_dense"] = row["ppl_healed"] / dense_eval["ppl"]
            row["ratio_healed_vs_control"] = row["ppl_healed"] / control_for(steps)
            row["heal_losses"] = losses
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(
            f"{v.name}: KV {before} -> {after} B/token, ppl {row['ppl']:.4f} (x{row['ratio']:.4f})"
            + (f", healed {row['ppl_healed']:.4f} (x{row['ratio_healed_vs_control']:.4f})" if v.heal else "")
        )

    report = {
        "command": "python examples/attention_quality.py"
        + (" --quick" if args.quick else "")
        + (" --reuse-dense" if args.reuse_dense else "")
        + f" --out {args.out}",
        "reused_dense": reused is not None,
        "started": started,
        "finished": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load": load_average()},
        "seconds": time.perf_counter() - t_start,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "sizes": asdict(s),
        "eval": {"windows": n_windows, "tokens": dense_eval["tokens"], "max_length": s.seq_len},
        "pretrain": curve,
        "dense": {"ppl": dense_eval["ppl"], "nll": dense_eval["nll"]},
        "dense_healed": controls[s.heal_steps],
        "dense_controls": list(controls.values()),
        "rows": rows,
    }
    report["targets"] = targets(rows, s)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "attention_quality.md").write_text(table)
    print(table)
    print(f"done in {report['seconds']:.0f} s; wrote {out / 'attention_quality.md'} and attention_quality.json")


if __name__ == "__main__":
    main()
