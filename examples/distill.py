"""Knowledge distillation from a larger teacher into a small student with the same tokenizer.

What it shows:
  * ``objective: {kind: distill, teacher: {path: ...}}``: response-based KD (forward KL between the
    temperature-softened distributions, T^2-scaled, mixed with the hard-label cross-entropy by ``ce_weight``)
    plus intermediate-layer distillation (MSE between a learned projection of a student layer's output and a
    teacher layer's output);
  * a student of the same size trained for the same steps on the labels alone, as the baseline;
  * held-out perplexity of teacher, distilled student and baseline student.

    python examples/distill.py --base runs/examples/pretrain/final   # teacher: pretrain.py's model
    python examples/distill.py --quick                               # pretrains a tiny teacher first (seconds)
"""

from __future__ import annotations

from pathlib import Path

from _common import heldout_texts, myllm_config, parse_args, prepare_data, pretrained_base, run_config, write_results

from myllm.eval import perplexity
from myllm.loading import load_model_and_tokenizer
from myllm.train import parse_config, read_metrics, train


def main() -> None:
    args = parse_args(__doc__, default_out="runs/examples/distill", base=True)
    out = Path(args.out)
    data = prepare_data(out, quick=args.quick)
    teacher_dir = pretrained_base(args, data)
    teacher, tokenizer = load_model_and_tokenizer(teacher_dir)
    t_cfg = teacher.config
    # the student: half the width and half the depth of the teacher (at least 2 layers), same tokenizer
    student_sizes = dict(
        hidden_size=t_cfg.hidden_size // 2,
        intermediate_size=t_cfg.intermediate_size // 2,
        num_hidden_layers=max(2, t_cfg.num_hidden_layers // 2),
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    student = {
        "config": myllm_config(t_cfg.vocab_size, quick=args.quick, **student_sizes),
        "tokenizer": str(teacher_dir),
    }
    pair = {"student": student_sizes["num_hidden_layers"] - 1, "teacher": t_cfg.num_hidden_layers - 1}
    steps = 40 if args.quick else 300
    seq_len = 64 if args.quick else 128

    results: dict = {"teacher": str(teacher_dir), "steps": steps, "layer_pair": pair}
    texts = heldout_texts(data, args.quick)
    window = dict(max_length=seq_len, stride=seq_len // 2, batch_size=16)
    results["teacher_ppl"] = perplexity(teacher, tokenizer, texts, **window)["ppl"]
    runs = {
        "distilled": {
            "kind": "distill",
            "teacher": {"path": str(teacher_dir)},
            "loss": "forward_kl",  # or reverse_kl, jsd
            "temperature": 2.0,
            "ce_weight": 0.5,  # loss = 0.5 CE + 0.5 T^2 KL + hidden_weight * MSE
            "hidden_layers": [pair],
            "hidden_weight": 1.0,
        },
        "baseline": {"kind": "pretrain"},  # the same student on the labels alone
    }
    for name, objective in runs.items():
        cfg = run_config(out / name, data, quick=args.quick, model=student, steps=steps, seq_len=seq_len)
        cfg["objective"] = objective
        cfg["checkpoint"] = {"resume": "never"}
        (out / name / "metrics.jsonl").unlink(missing_ok=True)
        print(f"training the {name} student ({steps} steps)")
        result = train(parse_config(cfg))
        model, _ = load_model_and_tokenizer(result.final_dir)
        history = read_metrics(result.metrics_file)
        results[name] = {
            "final_dir": str(result.final_dir),
            "parameters": sum(p.numel() for p in model.parameters()),
            "ppl": perplexity(model, tokenizer, texts, **window)["ppl"],
            "first": {k: v for k, v in history[0].items() if k in ("loss", "ce", "kd", "hidden")},
            "last": {k: v for k, v in history[-1].items() if k in ("loss", "ce", "kd", "hidden")},
        }
    results["teacher_parameters"] = sum(p.numel() for p in teacher.parameters())
    results["window"] = window
    write_results(out, results)


if __name__ == "__main__":
    main()
