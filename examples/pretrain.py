"""Pretrain a small dense MyLLM on English text from the Python standard library, then evaluate it.

What it shows:
  * a run described by one YAML file (written to OUT/run.yaml, paths relative to it) and trained with
    ``myllm.train`` step by step (``Trainer``: ``fit`` then ``export``);
  * held-out perplexity and bits-per-byte (``myllm.eval.perplexity``, sliding windows) before and after;
  * the exported ``final/`` directory reloaded with ``AutoModelForCausalLM.from_pretrained`` and a sample.

    python examples/pretrain.py            # hidden 128, 4 layers, 2k-token BPE, 400 steps (a few minutes)
    python examples/pretrain.py --quick    # tiny sizes, 40 steps (seconds)
    myllm train OUT/run.yaml               # the same run from the command line
"""

from __future__ import annotations

from pathlib import Path

import yaml
from _common import heldout_texts, myllm_config, parse_args, prepare_data, write_results

from myllm.data import load_tokenizer
from myllm.eval import perplexity
from myllm.generation import generate_text
from myllm.loading import load_model_and_tokenizer
from myllm.train import Trainer, load_config, read_metrics


def main() -> None:
    args = parse_args(__doc__, default_out="runs/examples/pretrain")
    out = Path(args.out)
    data = prepare_data(out, quick=args.quick)
    vocab = len(load_tokenizer(data.tokenizer))
    seq_len, steps = (64, 40) if args.quick else (128, 400)

    # the run as a user would write it: a YAML file whose relative paths resolve against its folder
    run = {
        "output_dir": ".",
        "model": {"config": myllm_config(vocab, quick=args.quick), "tokenizer": "data/tokenizer"},
        "data": {"kind": "shards", "path": "data/shards", "seq_len": seq_len},  # packed windows of token shards
        "objective": {"kind": "pretrain"},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.1},
        "schedule": {"kind": "cosine", "warmup_steps": steps // 10, "min_lr_ratio": 0.1},
        "engine": {"kind": "torch", "device": "cpu"},
        "train": {"max_steps": steps, "micro_batch_size": 8 if args.quick else 16, "grad_accum": 1, "seed": 0},
        "checkpoint": {"resume": "never"},
        "logging": {"every": 1, "progress": not args.quick},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    (out / "metrics.jsonl").unlink(missing_ok=True)  # a rerun starts a fresh log
    trainer = Trainer(load_config(out / "run.yaml"))
    n_params = sum(p.numel() for p in trainer.module.model.parameters())
    print(f"model: {type(trainer.module.model).__name__}, {n_params / 1e6:.2f}M parameters; {steps} steps")

    texts = heldout_texts(data, args.quick)
    window = dict(max_length=seq_len, stride=seq_len // 2, batch_size=16)
    before = perplexity(trainer.module.model, trainer.tokenizer, texts, **window)
    trainer.fit()
    result = trainer.export()  # OUT/final: a plain HF model directory with the tokenizer

    model, tokenizer = load_model_and_tokenizer(result.final_dir)  # AutoModelForCausalLM.from_pretrained
    after = perplexity(model, tokenizer, texts, **window)
    sample = generate_text(model, tokenizer, "Return the", max_new_tokens=24, do_sample=False)[0]
    losses = [r["loss"] for r in read_metrics(result.metrics_file)]
    write_results(
        out,
        {
            "steps": result.step,
            "parameters": n_params,
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "heldout_documents": len(texts),
            "window": window,
            "heldout_tokens": after["tokens"],
            "ppl_before": before["ppl"],
            "ppl_after": after["ppl"],
            "bits_per_byte_before": before["bits_per_byte"],
            "bits_per_byte_after": after["bits_per_byte"],
            "final_dir": str(result.final_dir),
            "sample": "Return the" + sample,
        },
    )


if __name__ == "__main__":
    main()
