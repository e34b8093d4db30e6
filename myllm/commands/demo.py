"""``myllm demo``: build a tiny MyLLM from registry blocks, swap a block, generate (finishes in seconds).

The training issue replaces this with the full demo (train a small model on bundled data).
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a tiny MyLLM from registry blocks, swap a block and generate")
    p.add_argument("--quick", action="store_true", help="the short form CI runs")
    p.add_argument("--new-tokens", type=int, default=12, help="tokens to generate")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from myllm import MyLLMConfig, MyLLMForCausalLM, blocks

    torch.manual_seed(0)
    print("registered blocks:")
    for kind in blocks.KINDS:
        print(f"  {kind:9s} {', '.join(blocks.available(kind))}")

    sizes = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
    config = MyLLMConfig(**sizes, num_key_value_heads=2, attention="sdpa", ffn="dense", norm="rmsnorm")
    model = MyLLMForCausalLM(config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"\nbuilt MyLLM: {config.num_hidden_layers} layers, {n_params / 1e3:.0f}k parameters, attention "
        f"{[type(layer.self_attn).__name__ for layer in model.model.layers]}"
    )

    # swap: eager attention on layers 1 and 3 through per-layer overrides; the weights move across unchanged
    swapped_config = MyLLMConfig(
        **sizes,
        num_key_value_heads=2,
        layer_overrides={"1": {"attention": "eager"}, "3": {"attention": "eager"}},
    )
    swapped = MyLLMForCausalLM(swapped_config).eval()
    swapped.load_state_dict(model.state_dict())
    prompt = torch.randint(0, sizes["vocab_size"], (2, 8))
    with torch.no_grad():
        diff = (swapped(prompt).logits - model(prompt).logits).abs().max().item()
    print(
        f"swapped layers 1 and 3 to eager attention: {[type(layer.self_attn).__name__ for layer in swapped.model.layers]}"
    )
    print(f"  same weights, max |logit diff| = {diff:.2e}")

    # and a swap on the live model: every layer to eager (what from_pretrained(attn_implementation=...) does)
    model.set_attn_implementation("eager")
    print(f"set_attn_implementation('eager'): config.attention = {model.config.attention}")

    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    dynamic = swapped.generate(prompt, **kw)
    static = swapped.generate(prompt, cache_implementation="static", **kw)
    print(f"generated {args.new_tokens} tokens per row (dynamic cache): {dynamic[:, prompt.shape[1] :].tolist()}")
    print(f"static cache gives the same tokens: {bool(torch.equal(dynamic, static))}")
    return 0
