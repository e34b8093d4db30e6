"""The demo, stage by stage: corpus -> tokenizer -> dense pretraining -> MoE upcycling -> continued training of
both -> save, reload, generate -> report.

Everything is written into a staging directory beside ``out`` and renamed into place at the end, so ``out``
holds either a complete run or (after a failure or Ctrl-C) whatever it held before.

Usage::

    results = run_demo("runs/demo")            # the full run (minutes on 2 CPU cores)
    results = run_demo("runs/q", preset=QUICK) # the CI form
    results["ppl"]["MoE continued"]["ppl"], results["upcycle"]["max_logit_diff"]
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from myllm import factory
from myllm.blocks.ffn.moe import expert_load
from myllm.data import build_corpus, tokenize_to_shards, train_tokenizer
from myllm.data.corpus import stdlib_root
from myllm.data.io import ensure_writable_dir, read_json, replace_dir
from myllm.demo.presets import FULL, Preset
from myllm.demo.report import RESULTS_FILE, Stopwatch, load_average, machine_info, write_outputs
from myllm.eval import JsonlTexts, perplexity
from myllm.generation import generate_text
from myllm.loading import load_causal_lm
from myllm.train import Trainer

# What the upcycled layers balance with: DeepSeek's aux-loss-free bias (the training loss stays plain CE, so
# the dense and MoE curves compare directly).
MOE_BALANCE = {"loss_free": 1e-2}
PROMPTS = ("Return the", "This module provides", "If the file")

Echo = Callable[[str], None]


def check_out_dir(out: str | os.PathLike) -> Path:
    """Refuse an ``out`` that is a file, cannot be created, or holds files that are not a previous demo run.

    A previous demo run (it has ``results.json`` written by the demo) is replaced as a whole at the end.

    Raises:
        ValueError: naming the problem.
    """
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ValueError(f"--out {p} is an existing file; give a directory")
    if p.is_dir() and any(p.iterdir()) and not _is_demo_run(p):
        names = ", ".join(sorted(c.name for c in p.iterdir())[:5])
        raise ValueError(
            f"--out {p} exists and holds files that are not a demo run ({names}); the demo replaces its output "
            "directory as a whole: choose a new or empty directory"
        )
    ensure_writable_dir(p.parent)
    return p


def _is_demo_run(p: Path) -> bool:
    try:
        return "myllm_demo" in read_json(p / RESULTS_FILE, "demo results")
    except (OSError, ValueError):
        return False


def run_demo(
    out: str | os.PathLike = "runs/demo",
    *,
    preset: Preset = FULL,
    threads: int | None = None,
    progress: bool = True,
    echo: Echo = print,
) -> dict[str, Any]:
    """Run the whole demo into ``out`` and return its results (also in ``out/results.json``, ``out/report.md``).

    Args:
        out: output directory: new, empty, or a previous demo run (replaced at the end).
        preset: sizes and steps (:data:`~myllm.demo.presets.FULL` or :data:`~myllm.demo.presets.QUICK`).
        threads: torch CPU threads (None: :func:`pick_threads`).
        progress: progress bars (training, tokenisation).
        echo: where the stage headers and numbers go.

    Raises:
        ValueError: a bad ``out`` or ``threads`` (checked before any work).
    """
    out = check_out_dir(out)
    n_threads = threads if threads is not None else pick_threads()
    if n_threads < 1:
        raise ValueError(f"threads must be >= 1, got {n_threads}")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    old_threads = torch.get_num_threads()
    hf_bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()  # transformers' own bars (loading and writing weights)
    try:
        torch.set_num_threads(n_threads)
        results = _stages(staging, preset, echo=echo, progress=progress)
        write_outputs(staging, results, echo=echo)
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(old_threads)
        if hf_bars:
            hf_logging.enable_progress_bar()
    echo(f"\nreport: {out / 'report.md'}")
    return results


def pick_threads() -> int:
    """torch's default thread count, lowered on a machine other processes already keep busy.

    With more busy threads than cores, torch's worker threads wait on each other and a step can take several
    times longer than with fewer threads; the 1-minute load average tells how many cores are taken.
    """
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:  # not available on this platform
        busy = 0.0
    return max(1, min(torch.get_num_threads(), round(cores - busy)))


def _stages(root: Path, preset: Preset, *, echo: Echo, progress: bool) -> dict[str, Any]:
    """Every stage of the demo, run in ``root``; returns the results (paths relative to ``root``)."""
    watch = Stopwatch(echo)
    res: dict[str, Any] = {"myllm_demo": 1, "preset": preset.as_dict(), "machine": machine_info(), "ppl": {}}

    # 1. corpus
    with watch.stage("corpus", "1/6 corpus: the Python standard library's docstrings (no download)"):
        package = stdlib_root() / preset.corpus_package if preset.corpus_package else None
        stats = build_corpus(root / "data", root=package, heldout_fraction=preset.heldout_fraction)
    res["corpus"] = {k: v for k, v in stats.as_dict().items() if k not in ("train_path", "heldout_path")}
    echo(
        f"  {stats.files} source files -> {stats.train_docs} train / {stats.heldout_docs} held-out documents, "
        f"{stats.bytes / 1e6:.2f} MB"
    )

    # 2. tokenizer and shards
    tok_dir, shard_dir = root / "data" / "tokenizer", root / "data" / "shards"
    with watch.stage("tokenizer", f"2/6 tokenizer: byte-level BPE, vocabulary {preset.vocab_size}, ChatML specials"):
        tok = train_tokenizer([Path(stats.train_path)], tok_dir, vocab_size=preset.vocab_size)
        shards = tokenize_to_shards(stats.train_path, shard_dir, tok, progress=progress)
    res["tokenizer"] = {"vocab_size": len(tok), "special_tokens": list(tok.all_special_tokens)}
    res["shards"] = {"documents": shards["documents"], "tokens": shards["tokens"]}
    echo(f"  {len(tok)} tokens; training data: {shards['tokens']:,} tokens in {shards['documents']} documents")
    heldout = JsonlTexts(stats.heldout_path, limit=preset.eval_docs)
    batch = heldout_batch(tok, heldout, preset.seq_len, rows=4)

    def evaluate(label: str, model: torch.nn.Module) -> dict[str, Any]:
        with watch.stage("evaluation"):
            r = perplexity(model, tok, heldout, max_length=preset.seq_len, stride=preset.seq_len // 2)
        res["ppl"][label] = r
        echo(f"  held-out {label}: ppl {r['ppl']:.2f}, {r['bits_per_byte']:.3f} bits/byte ({r['tokens']:,} tokens)")
        return r

    # 3. dense pretraining
    model_cfg = {"config": preset.model_config(len(tok)), "tokenizer": str(tok_dir)}
    with watch.stage("pretrain", f"3/6 pretrain a dense MyLLM: {preset.pretrain_steps} steps"):
        trainer = Trainer(
            preset.run_config(root / "pretrain", model_cfg, shard_dir, phase="pretrain", progress=progress)
        )
    evaluate("untrained", trainer.module.model)
    with watch.stage("pretrain"):
        trainer.fit()
        trainer.export()
    res["loss"] = {"pretrain": loss_summary(trainer.history)}
    evaluate("dense pretrained", trainer.module.model)
    del trainer

    # 4. upcycle, then continue training both
    with watch.stage("upcycle", f"4/6 upcycle to MoE ({preset.n_experts} experts, top-{preset.top_k}, init=copy)"):
        dense = load_causal_lm(root / "pretrain" / "final")
        moe = copy.deepcopy(dense)
        moe_kwargs = dict(n_experts=preset.n_experts, top_k=preset.top_k, balance=MOE_BALANCE)
        factory.replace(moe, "ffn", "moe", init="copy", **moe_kwargs)
        control = factory.replace(copy.deepcopy(dense), "ffn", "moe", init="random", **moe_kwargs)
        res["upcycle"] = {
            "n_experts": preset.n_experts,
            "top_k": preset.top_k,
            "balance": MOE_BALANCE,
            "max_logit_diff": max_logit_diff(dense, moe, batch),
            "control_random_init_diff": max_logit_diff(dense, control, batch),
            "tokens_compared": int(batch.numel()),
        }
        res["params"] = {"dense": param_counts(dense), "moe": param_counts(moe)}
        moe.save_pretrained(root / "upcycled")
        tok.save_pretrained(root / "upcycled")
        del dense, moe, control
    up = res["upcycle"]
    echo(
        f"  max |logit diff| dense vs upcycled MoE: {up['max_logit_diff']:.2e} over {up['tokens_compared']} "
        f"held-out tokens (a randomly initialised MoE instead: {up['control_random_init_diff']:.2f})"
    )
    echo(
        f"  parameters: dense {res['params']['dense']['total']:,}; MoE {res['params']['moe']['total']:,} total, "
        f"{res['params']['moe']['active']:,} active per token"
    )

    live = {}
    for label, key, source in (
        ("dense continued", "dense", root / "pretrain" / "final"),
        ("MoE continued", "moe", root / "upcycled"),
    ):
        title = f"5/6 continue training the {key} model: {preset.continue_steps} steps (same data and schedule)"
        with watch.stage(f"continue_{key}", title):
            cfg = preset.run_config(root / key, {"path": str(source)}, shard_dir, phase="continue", progress=progress)
            trainer = Trainer(cfg)
            trainer.fit()
            trainer.export()
        res["loss"][key] = loss_summary(trainer.history)
        if key == "moe":
            res["expert_load_training"] = summed_expert_load(trainer.history)
            res["max_vio_per_step"] = [r["max_vio"] for r in trainer.history if "max_vio" in r]
        evaluate(label, trainer.module.model)
        live[key] = trainer.module.model.eval()
        del trainer

    # 5. save, reload with transformers, generate
    with watch.stage("reload", "6/6 reload the saved MoE with AutoModelForCausalLM.from_pretrained, generate"):
        device = next(live["moe"].parameters()).device  # the training loop's device (a GPU where there is one)
        reloaded = load_causal_lm(root / "moe" / "final", device=device)
        res["reload"] = {
            "class": type(reloaded).__name__,
            "model_type": reloaded.config.model_type,
            "max_logit_diff": max_logit_diff(live["moe"], reloaded, batch),
            "control_dense_diff": max_logit_diff(live["dense"], reloaded, batch),
        }
        load_batch = heldout_batch(tok, heldout, preset.seq_len, rows=16)
        with torch.no_grad():
            reloaded(load_batch)
        res["expert_load_heldout"] = expert_load(reloaded)
        res["reload"]["load_tokens"] = int(load_batch.numel())
        texts = generate_text(
            reloaded, tok, list(PROMPTS), max_new_tokens=preset.new_tokens, temperature=0.8, top_p=0.95, seed=0
        )
        res["samples"] = [{"prompt": p, "text": t} for p, t in zip(PROMPTS, texts, strict=True)]
    rl = res["reload"]
    echo(
        f"  reloaded as {rl['class']}: max |logit diff| vs the in-memory model {rl['max_logit_diff']:.2e} "
        f"(vs the dense continued model: {rl['control_dense_diff']:.2f})"
    )
    for s in res["samples"]:
        echo(f"  > {(s['prompt'] + s['text']).replace(chr(10), ' ')}")
    res["timing"] = watch.seconds
    res["machine"]["load_average_end"] = load_average()
    return res


def heldout_batch(tokenizer: Any, texts: Iterable[str], seq_len: int, *, rows: int) -> torch.Tensor:
    """``[R, T]`` token ids of the first held-out documents (eos-separated), at most ``rows`` rows of ``seq_len``.

    Raises:
        ValueError: the texts hold fewer than two tokens.
    """
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(ids) >= rows * seq_len:
            break
    if len(ids) < 2:
        raise ValueError("the held-out texts hold fewer than two tokens")
    n_rows = max(1, min(rows, len(ids) // seq_len))
    width = min(seq_len, len(ids))
    return torch.tensor(ids[: n_rows * width]).view(n_rows, width)


@torch.no_grad()
def max_logit_diff(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor) -> float:
    """``max |logits_a - logits_b|`` of two models (in eval mode, each on its own device) on ``ids [B, T]``."""
    was = a.training, b.training
    a.eval(), b.eval()
    try:
        la, lb = (m(ids.to(next(m.parameters()).device)).logits.float().cpu() for m in (a, b))
        return float((la - lb).abs().max())
    finally:
        a.train(was[0]), b.train(was[1])


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    """Total parameters and those active per token (an MoE layer uses ``top_k`` of its ``n_experts`` experts)."""
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for module in model.modules():
        if getattr(module, "is_moe", False) and hasattr(module, "experts"):
            expert_params = sum(p.numel() for p in module.experts.parameters())
            idle += expert_params * (module.n_experts - module.top_k) // module.n_experts
    return {"total": total, "active": total - idle}


def loss_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """First and last training loss, the mean of the last 10% of steps, and the steps and tokens trained."""
    losses = [r["loss"] for r in history]
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "steps": history[-1]["step"] if history else 0,
        "tokens": history[-1]["tokens"] if history else 0,
        "first": losses[0] if losses else None,
        "last": losses[-1] if losses else None,
        "last_mean": sum(tail) / len(tail) if tail else None,
        "history": [{"step": r["step"], "loss": r["loss"]} for r in history],
    }


def summed_expert_load(history: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Tokens per expert of each MoE layer summed over a run's logged steps, with MaxVio (``expert_load`` format)."""
    from myllm.blocks.ffn.moe.balance import max_vio

    totals: dict[str, torch.Tensor] = {}
    for record in history:
        for layer, counts in (record.get("expert_load") or {}).items():
            t = torch.tensor(counts, dtype=torch.int64)
            totals[layer] = totals[layer] + t if layer in totals else t
    return {k: {"tokens_per_expert": v.tolist(), "max_vio": max_vio(v)} for k, v in totals.items()}
