"""``myllm generate MODEL --prompt ...``: sample or greedily decode with a cache block from the registry."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a local model")
    p.add_argument("model", help="model directory")
    p.add_argument("-p", "--prompt", action="append", required=True, help="prompt (repeat for a batch)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's own)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50, help="0: no top-k limit")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="dynamic", help="KV cache block from the registry (dynamic, static, ...)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from myllm.blocks import registry
    from myllm.generation import generate_text
    from myllm.loading import load_model_and_tokenizer

    if args.cache not in registry.available("cache"):  # before the model is loaded
        raise ValueError(
            f"unknown cache block {args.cache!r}; registered cache blocks: {', '.join(registry.available('cache'))}"
        )
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, dtype=args.dtype, device=args.device)
    outputs = generate_text(
        model,
        tok,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        cache=args.cache,
        chat=args.chat,
    )
    for prompt, text in zip(args.prompt, outputs, strict=True):
        print(f"{prompt}{text}" if not args.chat else text)
        if len(outputs) > 1:
            print("-" * 40)
    return 0
