"""Supervised fine-tuning with LoRA (PEFT) on chat data: questions about standard-library functions, answered
by the first line of their docstrings, rendered with the ChatML template; the loss is on assistant tokens only.

What it shows:
  * ``objective: {kind: sft}`` with chat JSONL (``{"conversations": [{"role", "content"}, ...]}``) and a
    ``lora:`` section: only the adapters train; at the end the adapter (``OUT/adapter``, a PEFT directory) and
    the merged plain model (``OUT/final``) are written;
  * the held-out answer loss (assistant tokens only) before and after, and answers to held-out questions.

    python examples/sft_lora.py --base runs/examples/pretrain/final   # on pretrain.py's model (a few minutes)
    python examples/sft_lora.py --quick                               # pretrains a tiny base first (seconds)
"""

from __future__ import annotations

from pathlib import Path

from _common import answer_loss, parse_args, prepare_data, pretrained_base, read_chats, run_config, write_results

from myllm.data import load_tokenizer
from myllm.generation import generate_text
from myllm.loading import load_model_and_tokenizer
from myllm.train import Trainer, parse_config, read_metrics


def main() -> None:
    args = parse_args(__doc__, default_out="runs/examples/sft_lora", base=True)
    out = Path(args.out)
    data = prepare_data(out, quick=args.quick)
    base = pretrained_base(args, data)
    steps = 40 if args.quick else 300

    cfg = run_config(out, data, quick=args.quick, model={"path": str(base)}, steps=steps, lr=1e-2)
    cfg["data"] = {"path": str(data.chat_train), "format": "chat", "seq_len": 96}  # one conversation per row
    cfg["objective"] = {"kind": "sft"}  # loss on assistant tokens (content + <|im_end|>)
    cfg["optimizer"]["weight_decay"] = 0.0
    cfg["lora"] = {
        "r": 8,
        "alpha": 16,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "save": "both",  # OUT/adapter (PEFT) and OUT/final (merged)
    }
    cfg["checkpoint"] = {"resume": "never"}
    (out / "metrics.jsonl").unlink(missing_ok=True)
    trainer = Trainer(parse_config(cfg))
    trainable = sum(p.numel() for p in trainer.module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.module.parameters())
    print(f"LoRA: {trainable} of {total} parameters train ({100 * trainable / total:.1f}%)")

    heldout = read_chats(data.chat_heldout)[: 16 if args.quick else None]
    base_model, tokenizer = load_model_and_tokenizer(base)
    before = answer_loss(base_model, tokenizer, heldout)
    trainer.fit()
    result = trainer.export()

    merged, _ = load_model_and_tokenizer(result.final_dir)
    after = answer_loss(merged, tokenizer, heldout)
    questions = [conv[0]["content"] for conv in heldout[:3]]
    answers = generate_text(merged, load_tokenizer(result.final_dir), questions, chat=True, do_sample=False)
    losses = [r["loss"] for r in read_metrics(result.metrics_file)]
    write_results(
        out,
        {
            "base": str(base),
            "steps": result.step,
            "trainable_parameters": trainable,
            "parameters": total,
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "heldout_conversations": len(heldout),
            "answer_loss_before": before,
            "answer_loss_after": after,
            "adapter_dir": str(result.adapter_dir),
            "merged_dir": str(result.final_dir),
            "answers": [{"question": q, "answer": a} for q, a in zip(questions, answers, strict=True)],
        },
    )


if __name__ == "__main__":
    main()
