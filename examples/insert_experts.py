"""Insert new experts into a pretrained MoE and fine-tune only them (and the dense parts) on chat data, with the
old experts frozen.

What it shows:
  * a Hugging Face Qwen3-MoE model built from its config (no download) and pretrained with ``myllm.train``;
  * ``myllm.surgery.add_experts(model, n_new=2, freeze_existing=True)``: every MoE layer gets 2 experts in a
    separately routed group whose output projections start at zero, so the logits are unchanged at insertion;
    the old experts' rows (of the fused ``gate_up_proj``/``down_proj`` and of the router) are frozen;
  * SFT of the grown model in memory (``Trainer(cfg, model=model)``: row freezing is not saved with a
    checkpoint) with AdamW and weight decay, after which the old experts are bit-identical and the new ones
    have learned; the result saved and reloaded with ``AutoModelForCausalLM.from_pretrained``.

    python examples/insert_experts.py            # hidden 128, 4 layers, 8 experts (a few minutes)
    python examples/insert_experts.py --quick    # tiny sizes (seconds)
"""

from __future__ import annotations

from pathlib import Path

import torch
from _common import answer_loss, parse_args, prepare_data, read_chats, run_config, write_results

from myllm import surgery
from myllm.data import load_tokenizer
from myllm.loading import load_model_and_tokenizer
from myllm.surgery import moe_parts
from myllm.train import Trainer, parse_config, read_metrics, train

N_NEW = 2


def qwen3_moe_config(vocab_size: int, *, quick: bool) -> dict:
    sizes = (
        dict(hidden_size=32, num_hidden_layers=2, num_experts=4, moe_intermediate_size=32)
        if quick
        else dict(hidden_size=128, num_hidden_layers=4, num_experts=8, moe_intermediate_size=128)
    )
    return {
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": sizes["hidden_size"] // 4,
        "intermediate_size": 4 * sizes["hidden_size"],  # unused: every layer is sparse
        "num_experts_per_tok": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        **sizes,
    }


def expert_rows(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every MoE layer's fused expert tensors and router weight, by parameter name."""
    rows = {}
    for name, module in model.named_modules():
        parts = moe_parts(module)
        if parts is not None:
            experts, experts_attr, router, router_attr = parts
            for key in ("gate_up_proj", "down_proj"):
                rows[f"{name}.{experts_attr}.{key}"] = getattr(experts, key).detach().clone()
            rows[f"{name}.{router_attr}.weight"] = router.weight.detach().clone()
    return rows


def main() -> None:
    args = parse_args(__doc__, default_out="runs/examples/insert_experts")
    out = Path(args.out)
    data = prepare_data(out, quick=args.quick)
    vocab = len(load_tokenizer(data.tokenizer))

    # 1. a pretrained MoE: Qwen3-MoE from its config, pretrained on the stdlib corpus
    base_dir = out / "base" / "final"
    if not (base_dir / "config.json").is_file():
        model_spec = {"config": qwen3_moe_config(vocab, quick=args.quick), "tokenizer": str(data.tokenizer)}
        steps = 40 if args.quick else 300
        print(f"pretraining a Qwen3-MoE base ({steps} steps)")
        cfg = run_config(out / "base", data, quick=args.quick, model=model_spec, steps=steps, shards=True)
        train(parse_config(cfg))

    # 2. insert experts: outputs unchanged, old experts frozen
    model, tokenizer = load_model_and_tokenizer(base_dir)
    n_old = model.config.num_experts
    probe = torch.tensor(tokenizer("Return the value of the header.", add_special_tokens=False)["input_ids"])[None]
    with torch.no_grad():
        logits_before = model(probe).logits
        surgery.add_experts(model, n_new=N_NEW, freeze_existing=True, top_k_new=1)
        insert_diff = (model(probe).logits - logits_before).abs().max().item()
    print(
        f"added {N_NEW} experts per MoE layer ({n_old} -> {model.config.num_experts}); max |logit diff| {insert_diff:.2e}"
    )
    print(surgery.trainable_report(model))
    grown_dir = out / "grown"
    model.save_pretrained(grown_dir)  # records the surgery: from_pretrained rebuilds the grown structure
    tokenizer.save_pretrained(grown_dir)
    before = expert_rows(model)

    # 3. SFT of the grown model (in memory: the frozen rows are part of the live model, not of the checkpoint)
    steps = 40 if args.quick else 300
    cfg = run_config(out / "sft", data, quick=args.quick, model={"path": str(grown_dir)}, steps=steps, lr=3e-3)
    cfg["data"] = {"path": str(data.chat_train), "format": "chat", "seq_len": 96}
    cfg["objective"] = {"kind": "sft"}
    cfg["checkpoint"] = {"resume": "never"}
    (out / "sft" / "metrics.jsonl").unlink(missing_ok=True)
    heldout = read_chats(data.chat_heldout)[: 16 if args.quick else None]
    loss_before = answer_loss(model, tokenizer, heldout)
    trainer = Trainer(parse_config(cfg), model=model)
    trainer.fit()
    result = trainer.export()

    # 4. the old experts did not move, the new ones did
    after = expert_rows(model)
    frozen_diff = max((after[k][:n_old] - v[:n_old]).abs().max().item() for k, v in before.items())
    frozen_equal = all(torch.equal(after[k][:n_old], v[:n_old]) for k, v in before.items())
    new_change = {k: (after[k][n_old:] - v[n_old:]).norm().item() for k, v in before.items()}
    reloaded, _ = load_model_and_tokenizer(result.final_dir)
    history = read_metrics(result.metrics_file)
    write_results(
        out,
        {
            "base_dir": str(base_dir),
            "grown_dir": str(grown_dir),
            "final_dir": str(result.final_dir),
            "n_old": n_old,
            "n_new": N_NEW,
            "max_logit_diff_at_insertion": insert_diff,
            "steps": result.step,
            "first_loss": history[0]["loss"],
            "last_loss": history[-1]["loss"],
            "answer_loss_before": loss_before,
            "answer_loss_after": answer_loss(reloaded, tokenizer, heldout),
            "frozen_rows_bit_identical": frozen_equal,
            "frozen_rows_max_abs_change": frozen_diff,
            "new_rows_change_norm": new_change,
            "reloaded_type": type(reloaded).__name__,
        },
    )


if __name__ == "__main__":
    main()
