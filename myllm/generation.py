"""Text generation with sampling options and the KV cache chosen from the block registry (``myllm generate``).

The cache is a registry block (``myllm.blocks.available("cache")``: ``dynamic``, ``static``, ``latent`` for MLA
...), built here from the model's config, sized for the prompt plus the new tokens, and passed to ``generate``
as ``cache`` (MyLLM and any other HF causal LM alike).

Usage::

    texts = generate_text(model, tokenizer, "Return the", max_new_tokens=32, temperature=0.8, top_p=0.9, seed=0)
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

from myllm.blocks import registry

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def cache_kwargs(model: PreTrainedModel, cache: str, max_len: int) -> dict[str, Any]:
    """``generate`` keywords that make it decode with the registry's cache block ``cache``.

    The block is built here from the model's config (blocks with a ``max_cache_len`` get ``max_len``) and
    passed as ``cache``, for MyLLM and any other HF causal LM alike.

    Raises:
        ValueError: ``cache`` is not a registered cache block (the message lists them).
    """
    names = registry.available("cache")
    if cache not in names:
        raise ValueError(f"unknown cache block {cache!r}; registered cache blocks: {', '.join(names)}")
    spec = registry.get("cache", cache)
    kwargs: dict[str, Any] = {"config": model.config}
    if "max_cache_len" in spec.config.model_fields:
        kwargs["max_cache_len"] = max_len
    return {"cache": spec.build(**kwargs)}


def generate_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: str | list[str],
    *,
    max_new_tokens: int = 64,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = 0,
    cache: str = "dynamic",
    chat: bool = False,
) -> list[str]:
    """Continue each prompt and return the new text (special tokens removed), one string per prompt.

    Args:
        prompts: one prompt or a list (left-padded into one batch).
        max_new_tokens: tokens to generate at most (generation stops early at the eos token).
        do_sample: sample (with ``temperature``, ``top_k``, ``top_p``); False decodes greedily.
        temperature: > 0; divides the logits before sampling.
        top_k: keep the ``k`` most likely tokens (None: no limit).
        top_p: nucleus sampling, ``0 < top_p <= 1`` (None: no limit).
        repetition_penalty: > 0, CTRL-style (None: off).
        seed: seeds the sampling RNG (the global RNG state is restored afterwards); None: unseeded.
        cache: a registered cache block name.
        chat: wrap each prompt as a user turn with the tokenizer's chat template (generation prompt added).

    Raises:
        ValueError: bad sampling values, an unknown cache block, an empty prompt, no chat template.
    """
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise ValueError("no prompt given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy decoding for 0), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if chat:
        if not tokenizer.chat_template:
            raise ValueError("--chat needs a tokenizer with a chat template")
        prompt_list = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompt_list
        ]

    tok = copy.copy(tokenizer)
    tok.padding_side = "left"
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad prompts with")
    # the tokenizer's own special tokens (a Llama tokenizer adds bos; a ChatML one adds nothing); a chat template
    # already holds them
    ids = [tok(p, add_special_tokens=not chat)["input_ids"] for p in prompt_list]
    if any(len(seq) == 0 for seq in ids):
        raise ValueError("empty prompt: this tokenizer adds no start token, so there is nothing to continue")
    width = max(len(seq) for seq in ids)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in ids], device=device)
    attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids], device=device)

    config = copy.deepcopy(model.generation_config)
    sampling = (
        dict(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=top_p if top_p is not None else 1.0)
        if do_sample
        else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    )
    config.update(
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=tok.eos_token_id,
        repetition_penalty=repetition_penalty,
        **sampling,
    )
    kwargs = cache_kwargs(model, cache, width + max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **kwargs
            )
    finally:
        model.train(was_training)
    return tok.batch_decode(out[:, width:], skip_special_tokens=True)
