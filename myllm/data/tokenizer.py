"""Tokenizers: train a byte-level BPE with ChatML special tokens, load any local HF tokenizer directory, fingerprint.

The trained tokenizer follows MiniMind's layout (shared/reference/training.md): ``<|endoftext|>`` (id 0) is
the pad and unk token, ``<|im_start|>`` (id 1) the bos token, ``<|im_end|>`` (id 2) the eos token, nothing is
added automatically, and the chat template is ChatML. Pretraining shards end every document with eos, so a
model stops generating where a document or a chat turn ends.

Usage::

    tok = train_tokenizer(texts, "tok", vocab_size=2048)     # writes a HF tokenizer directory
    tok = load_tokenizer("tok")                              # any local HF tokenizer directory
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from myllm.data.io import PathLike, ensure_writable_dir, iter_jsonl, replace_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHATML_SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Files one of which a HF tokenizer directory holds (fast, or slow vocabularies that transformers converts).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")

# What a tokenizer directory written here may hold; retraining replaces such a directory, never one with more.
_REPLACEABLE = frozenset(
    {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "added_tokens.json"}
)

TokenizerLike = Union["PreTrainedTokenizerBase", str, os.PathLike]


def _iter_texts(source: Iterable[str] | os.PathLike[str] | list[os.PathLike[str]], field: str) -> Iterable[str]:
    """Texts from an iterable of strings, or from JSONL (``field``) / plain-text files given as path objects."""
    if isinstance(source, str):
        raise ValueError("pass training texts as a list of strings, or files as pathlib.Path objects")
    if isinstance(source, os.PathLike):
        source = [source]
    if isinstance(source, (list, tuple)) and source and all(isinstance(p, os.PathLike) for p in source):
        paths = [Path(p) for p in source]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"tokenizer training files not found: {', '.join(missing)}")
        return _texts_from_files(paths, field)
    return source


def _texts_from_files(paths: list[Path], field: str) -> Iterable[str]:
    for p in paths:
        if p.suffix in (".jsonl", ".json"):
            for _, text in iter_jsonl(p, field):
                yield text
        else:
            yield p.read_text(encoding="utf-8")


def train_tokenizer(
    texts: Iterable[str] | os.PathLike[str] | list[os.PathLike[str]],
    out_dir: PathLike,
    *,
    vocab_size: int = 6400,
    min_frequency: int = 2,
    special_tokens: tuple[str, ...] = CHATML_SPECIAL_TOKENS,
    chat_template: str = CHATML_TEMPLATE,
    field: str = "text",
) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer and write it as a HF tokenizer directory.

    Args:
        texts: an iterable of strings, or ``pathlib.Path`` objects of JSONL (``field`` of each line) or
            plain-text files (a plain ``str`` is never taken as a path).
        out_dir: the tokenizer directory (``tokenizer.json``, ``tokenizer_config.json``, chat template);
            written into a temporary directory and renamed into place.
        vocab_size: total vocabulary including the special tokens and the 256 byte tokens.
        min_frequency: minimum pair count for a merge.
        special_tokens: the first three are used as pad/unk, bos and eos (ChatML by default).
        chat_template: Jinja chat template stored with the tokenizer.
        field: JSONL field holding the text.

    Returns:
        The trained tokenizer, loaded back from ``out_dir`` with :func:`load_tokenizer`.

    Raises:
        ValueError: too small a vocabulary, fewer than three special tokens, an unwritable ``out_dir``, no text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if len(special_tokens) < 3 or len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"need three distinct special tokens (pad/unk, bos, eos), got {special_tokens}")
    min_vocab = 256 + len(special_tokens)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be >= {min_vocab} (256 bytes + special tokens), got {vocab_size}")
    out = Path(out_dir)
    ensure_writable_dir(out.parent)
    if out.exists():
        others = sorted(p.name for p in out.iterdir() if p.name not in _REPLACEABLE) if out.is_dir() else [out.name]
        if others:
            raise ValueError(
                f"{out} exists and holds more than a tokenizer ({', '.join(others[:5])}); it would be replaced "
                "as a whole: choose a new or empty directory"
            )

    count = [0]

    def counted(it: Iterable[str]) -> Iterable[str]:
        for t in it:
            count[0] += 1
            yield t

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(counted(_iter_texts(texts, field)), trainer=trainer)
    if count[0] == 0:
        raise ValueError("no training text given to train_tokenizer")
    pad, bos, eos = special_tokens[:3]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=pad,
        unk_token=pad,
        bos_token=bos,
        eos_token=eos,
        additional_special_tokens=list(special_tokens[3:]) or None,
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )
    _save_dir_atomic(hf, out)
    return load_tokenizer(out)


def _save_dir_atomic(tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """``save_pretrained`` into a temporary sibling directory, then swap it in place of ``out``."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_tokenizer(tokenizer: TokenizerLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local HF tokenizer (or model) directory; a loaded tokenizer is returned as is.

    Never downloads and never runs remote code. Every place in myllm that takes a tokenizer goes through here.

    Raises:
        ValueError: the path is not a directory, holds no tokenizer files, or transformers cannot load it
            (the message names the directory and the reason).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if not isinstance(tokenizer, (str, os.PathLike)):
        raise ValueError(f"expected a tokenizer or a tokenizer directory, got {type(tokenizer).__name__}")
    path = Path(tokenizer)
    if not path.is_dir():
        what = "a file" if path.exists() else "missing"
        raise ValueError(f"tokenizer {path} is {what}; expected a local HF tokenizer directory (no hub downloads)")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(f"{path} is not a tokenizer directory: none of {', '.join(_TOKENIZER_FILES)} found")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, KeyError, JSON errors)
        raise ValueError(f"{path} is not a loadable tokenizer directory: {type(exc).__name__}: {exc}") from exc
    if not isinstance(tok, PreTrainedTokenizerBase):
        raise ValueError(f"{path} loaded as {type(tok).__name__}, not a tokenizer")
    return tok


def backend_json(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The ``tokenizers`` JSON of a fast tokenizer with truncation and padding switched off (None if slow)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy.to_str()


def tokenizer_fingerprint(tokenizer: TokenizerLike) -> str:
    """A hash identifying what a tokenizer does to text: sha256 of its canonical serialised JSON.

    Fast tokenizers hash ``tokenizer.json`` (keys sorted, truncation/padding removed: they are call options);
    slow ones hash their class name, vocabulary and added tokens.
    """
    tok = load_tokenizer(tokenizer)
    raw = backend_json(tok)
    if raw is not None:
        obj: Any = json.loads(raw)
        obj.pop("truncation", None)
        obj.pop("padding", None)
    else:
        obj = {"class": type(tok).__name__, "vocab": sorted(tok.get_vocab().items())}
    obj = {"tokenizer": obj, "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}}
    data = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return "sha256:" + hashlib.sha256(data).hexdigest()
