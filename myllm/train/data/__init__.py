"""Training data for the loop: JSONL files read into memory and served as ``WindowSource`` windows.

:func:`build_source` turns a run's ``data`` section into a source for one data-parallel rank. Text documents
(pretraining) end with the tokenizer's EOS token and are trained on every token; chat conversations (SFT) are
rendered with the chat template and trained on assistant tokens only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from myllm.data.source import WindowSource
from myllm.train.data.chat import encode_chat, resolve_template
from myllm.train.data.jsonl import read_conversations, read_texts
from myllm.train.data.sources import IGNORE, Example, PackedExamples, PaddedExamples, collate

__all__ = [
    "IGNORE",
    "Example",
    "PackedExamples",
    "PaddedExamples",
    "build_source",
    "collate",
    "pad_id",
    "text_examples",
    "chat_examples",
]


def pad_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS token."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")


def text_examples(tokenizer: Any, texts: list[str]) -> list[Example]:
    """Tokenise documents and append EOS to each; every token is a target."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token, which separates documents; set tokenizer.eos_token")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [(list(x) + [eos], list(x) + [eos]) for x in ids]


def chat_examples(tokenizer: Any, convs: list[list[dict[str, str]]], template: str | None) -> list[Example]:
    """Render and tokenise conversations; targets are the assistant tokens, everything else ``-100``."""
    tpl = resolve_template(tokenizer, template)
    out = []
    for conv in convs:
        ids, mask = encode_chat(tokenizer, conv, tpl)
        out.append((ids, [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]))
    return out


def _jsonl_source(cfg: Any, tokenizer: Any, *, rank: int, world_size: int, seed: int) -> WindowSource:
    data = cfg.data
    if cfg.data_format == "text":
        examples = text_examples(tokenizer, read_texts(data.paths(), data.text_field))
    else:
        examples = chat_examples(tokenizer, read_conversations(data.paths(), data.messages_field), data.chat_template)
        # a conversation whose assistant turns all lie past seq_len has nothing left to learn from
        examples = [ex for ex in examples if any(t != IGNORE for t in ex[1][1 : data.seq_len])]
        if not examples:
            raise ValueError(f"empty dataset: no conversation has an assistant token within seq_len={data.seq_len}")
    common = dict(seq_len=data.seq_len, seed=seed, shuffle=data.shuffle, rank=rank, world_size=world_size)
    if cfg.packing:
        return PackedExamples(examples, pad_id=pad_id(tokenizer), **common)
    return PaddedExamples(examples, **common)


def _shard_source(cfg: Any, tokenizer: Any, *, rank: int, world_size: int, seed: int) -> WindowSource:
    from myllm.data import ShardSource

    data = cfg.data
    paths = dict(data.path) if isinstance(data.path, dict) else data.paths()
    return ShardSource(
        paths,
        data.seq_len,
        tokenizer=tokenizer,  # the shards' tokenizer fingerprint must match (checked before training)
        vocab_size=len(tokenizer),
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle=data.shuffle,
        num_workers=data.num_workers,
    )


# data.kind -> builder(run_config, tokenizer, rank=, world_size=, seed=) -> WindowSource
SOURCES: dict[str, Callable[..., WindowSource]] = {"jsonl": _jsonl_source, "shards": _shard_source}


def build_source(cfg: Any, tokenizer: Any, *, rank: int = 0, world_size: int = 1) -> WindowSource:
    """The window source of a run config's ``data`` section for one data-parallel rank."""
    return SOURCES[cfg.data.kind](cfg, tokenizer, rank=rank, world_size=world_size, seed=cfg.train.seed)
