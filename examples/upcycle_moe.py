"""Dense -> MoE upcycling with ``factory.replace``, then continued pretraining of both at equal steps.

What it shows:
  * ``factory.replace(model, "ffn", "moe", n_experts=4, top_k=2)`` turns every dense MLP of a pretrained model
    into a mixture of experts whose experts are copies of the MLP (``init="copy"``): with renormalised top-k
    weights the upcycled model computes the same function, so the logits are unchanged (measured here);
  * the upcycled model saved with ``save_pretrained`` and reloaded by ``AutoModelForCausalLM`` (same logits);
  * continued pretraining of the dense and of the MoE model for the same steps with ``myllm.train`` (Switch
    balancing loss and aux-loss-free bias balancing; tokens per expert and MaxVio logged), and their held-out
    perplexity.

    python examples/upcycle_moe.py --base runs/examples/pretrain/final   # on pretrain.py's model
    python examples/upcycle_moe.py --quick                               # pretrains a tiny base first (seconds)
"""

from __future__ import annotations

from pathlib import Path

import torch
from _common import heldout_texts, parse_args, prepare_data, pretrained_base, run_config, write_results

from myllm import factory
from myllm.eval import perplexity
from myllm.loading import load_model_and_tokenizer
from myllm.train import parse_config, read_metrics, train


def probe_batch(tokenizer, texts: list[str], length: int) -> torch.Tensor:
    """``[4, length]`` token ids from the first held-out documents (concatenated, then cut)."""
    ids = tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: 4 * length]).view(4, length)


def main() -> None:
    args = parse_args(__doc__, default_out="runs/examples/upcycle_moe", base=True)
    out = Path(args.out)
    data = prepare_data(out, quick=args.quick)
    base = pretrained_base(args, data)
    steps = 30 if args.quick else 200
    seq_len = 64 if args.quick else 128
    texts = heldout_texts(data, args.quick)

    dense, tokenizer = load_model_and_tokenizer(base)
    moe, _ = load_model_and_tokenizer(base)
    factory.replace(moe, "ffn", "moe", n_experts=4, top_k=2, balance={"switch": 0.01, "loss_free": 0.001})
    print(f"upcycled: {type(moe.model.layers[0].mlp).__name__} in every layer; ffn spec {moe.config.ffn}")
    probe = probe_batch(tokenizer, texts, 32)
    with torch.no_grad():
        dense_logits = dense(probe).logits
        upcycle_diff = (moe(probe).logits - dense_logits).abs().max().item()
    print(f"max |logit difference| dense vs upcycled: {upcycle_diff:.2e}")

    upcycled_dir = out / "upcycled"
    moe.save_pretrained(upcycled_dir)
    tokenizer.save_pretrained(upcycled_dir)
    reloaded, _ = load_model_and_tokenizer(upcycled_dir)
    with torch.no_grad():
        reload_diff = (reloaded(probe).logits - dense_logits).abs().max().item()

    results: dict = {
        "base": str(base),
        "upcycled_dir": str(upcycled_dir),
        "max_logit_diff_upcycled": upcycle_diff,
        "max_logit_diff_reloaded": reload_diff,
        "steps": steps,
    }
    window = dict(max_length=seq_len, stride=seq_len // 2, batch_size=16)
    results["base_ppl"] = perplexity(dense, tokenizer, texts, **window)["ppl"]
    for name, model_dir in (("dense", base), ("moe", upcycled_dir)):
        cfg = run_config(out / name, data, quick=args.quick, model={"path": str(model_dir)}, steps=steps, lr=1e-3)
        cfg["data"]["seq_len"] = seq_len
        cfg["checkpoint"] = {"resume": "never"}
        (out / name / "metrics.jsonl").unlink(missing_ok=True)
        print(f"continued pretraining: {name} ({steps} steps)")
        result = train(parse_config(cfg))
        history = read_metrics(result.metrics_file)
        model, _ = load_model_and_tokenizer(result.final_dir)
        results[name] = {
            "final_dir": str(result.final_dir),
            "parameters": sum(p.numel() for p in model.parameters()),
            "first_loss": history[0]["loss"],
            "last_loss": history[-1]["loss"],
            "ppl": perplexity(model, tokenizer, texts, **window)["ppl"],
        }
        if "max_vio" in history[-1]:
            results[name]["max_vio_first"] = history[0]["max_vio"]
            results[name]["max_vio_last"] = history[-1]["max_vio"]
            results[name]["expert_load_last"] = history[-1]["expert_load"]
    write_results(out, results)


if __name__ == "__main__":
    main()
