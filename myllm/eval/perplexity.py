"""Token-level perplexity and bits-per-byte of a causal LM on held-out text, with strided sliding windows.

Conventions (transformers' guide "Perplexity of fixed-length models"; the team's training reference, section 3):

* Every document is tokenised on its own, without the tokenizer's automatic special tokens; ``add_bos`` puts
  the bos token in front (as context: then every token of the document is scored), ``add_eos`` appends eos
  (scored, zero bytes). Without ``add_bos`` the first token of a document is context only.
* A document of ``n`` tokens is read in windows ``[b, min(b + max_length, n))`` for ``b = 0, stride,
  2 * stride, ...`` (the last window reaches the end). A window scores the tokens after the previous window's end
  (and after its own first token, which has no context inside the window); the tokens before are context,
  labelled ``-100``. ``stride == max_length`` gives disjoint windows, whose first tokens are context only, as in
  the guide's loop; a smaller stride gives every scored token at least ``max_length - stride`` tokens of context.
* ``ppl = exp(sum NLL / N)``: the negative log-likelihoods (nats, from float32 log-softmax, summed in float64)
  of all ``N`` scored tokens of all documents, exponentiated once; never a mean of per-window or per-batch means.
* ``bits_per_byte = sum NLL / (ln 2 * B)`` where ``B`` is the UTF-8 bytes of the scored text: each token owns the
  bytes from its start offset in the document to the next token's (special tokens own none), so ``B`` does not
  depend on the tokenizer and models with different tokenizers compare (lm-evaluation-harness' definition).

Usage::

    result = perplexity(model, tokenizer, texts, max_length=512, stride=256, batch_size=8)
    result["ppl"], result["bits_per_byte"], result["tokens"], result["bytes"]
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from myllm.data.io import iter_jsonl
from myllm.loading import check_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100


@dataclass
class Window:
    """One model call's worth of a document: ``ids [L]`` with ``labels [L]`` (-100 = context) and scored bytes."""

    ids: np.ndarray
    labels: np.ndarray
    n_bytes: int


def window_bounds(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of an ``n_tokens`` document: ``(begin, end, first_scored)`` triples (HF's sliding window).

    Tokens ``[first_scored, end)`` of window ``[begin, end)`` are scored; each token ``1 .. n_tokens - 1`` is
    scored at most once, and exactly once when ``stride < max_length``. A document of fewer than 2 tokens has no
    window.
    """
    if max_length < 2 or not 1 <= stride <= max_length:
        raise ValueError(f"need max_length >= 2 and 1 <= stride <= max_length, got {max_length}, {stride}")
    out: list[tuple[int, int, int]] = []
    prev_end = 0
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + max_length, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


def token_bytes(text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """UTF-8 bytes owned by each token ``[n]``: from its start offset to the next token's (the last to the end).

    The first token also owns anything before its offset, so the bytes of a document's tokens sum to its size.
    Tokens that split one character share it: the first gets its bytes, the rest none.
    """
    n = len(offsets)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.maximum.accumulate(np.array([s for s, _ in offsets], dtype=np.int64))
    starts[0] = 0
    encoded_len = len(text.encode("utf-8"))
    if encoded_len == len(text):  # ASCII: characters are bytes
        byte_starts = starts
    else:
        char_bytes = np.fromiter((len(c.encode("utf-8")) for c in text), dtype=np.int64, count=len(text))
        cum = np.concatenate([[0], np.cumsum(char_bytes)])
        byte_starts = cum[np.minimum(starts, len(text))]
    return np.diff(np.append(byte_starts, encoded_len))


def document_windows(
    ids: list[int], n_bytes: np.ndarray, max_length: int, stride: int, *, prefix: int, suffix: int
) -> list[Window]:
    """Windows of one document: ``ids`` include ``prefix`` leading and ``suffix`` trailing special tokens.

    ``n_bytes`` gives the bytes of the document's own tokens (``len(ids) - prefix - suffix`` of them).
    """
    arr = np.asarray(ids, dtype=np.int64)
    owned = np.concatenate([np.zeros(prefix, np.int64), n_bytes, np.zeros(suffix, np.int64)])
    out = []
    for begin, end, first in window_bounds(len(arr), max_length, stride):
        labels = np.full(end - begin, IGNORE, dtype=np.int64)
        labels[first - begin :] = arr[first:end]
        out.append(Window(arr[begin:end], labels, int(owned[first:end].sum())))
    return out


def _batches(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Windows grouped by length (longest first) so that batches need little padding."""
    order = sorted(range(len(windows)), key=lambda i: (-len(windows[i].ids), i))
    for i in range(0, len(order), batch_size):
        yield [windows[j] for j in order[i : i + batch_size]]


@torch.inference_mode()
def score_windows(model: torch.nn.Module, windows: list[Window], pad_id: int) -> tuple[float, int]:
    """Summed NLL (nats, float64) and number of scored tokens of a batch of windows, right-padded into one call.

    ``logits [B, T, V]`` -> float32 log-softmax; position ``t`` predicts ``labels[t + 1]``.
    """
    device = next(model.parameters()).device
    T = max(len(w.ids) for w in windows)
    ids = torch.full((len(windows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(windows), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(windows), T), dtype=torch.long)
    for row, w in enumerate(windows):
        ids[row, : len(w.ids)] = torch.from_numpy(w.ids)
        labels[row, : len(w.ids)] = torch.from_numpy(w.labels)
        mask[row, : len(w.ids)] = 1
    padded = bool((mask == 0).any())
    logits = model(
        input_ids=ids.to(device), attention_mask=mask.to(device) if padded else None, use_cache=False
    ).logits
    targets = labels[:, 1:].to(device)  # (B, T-1)
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return nll.double().sum().item(), int((targets != IGNORE).sum().item())


def perplexity(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    add_bos: bool = False,
    add_eos: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Perplexity and bits-per-byte of ``model`` on ``texts`` (see the module docstring for the conventions).

    Args:
        model: a causal LM returning ``logits [B, T, V]`` (put in eval mode for the call, restored after).
        tokenizer: a fast tokenizer (offsets are needed for the byte counts) matching the model.
        texts: documents (streamed in chunks; a generator is fine).
        max_length: tokens per window (default: the model's ``max_position_embeddings``, at most 1024).
        stride: window step, ``1 <= stride <= max_length`` (default ``max_length``: disjoint windows).
        batch_size: windows per forward pass (does not change the result beyond float rounding).
        add_bos: put the bos token before every document as context (all document tokens are then scored).
        add_eos: append the eos token to every document (scored; it owns no bytes).
        progress: a tqdm bar over documents.

    Returns:
        ``{"ppl", "nll" (mean nats/token), "nll_sum", "tokens", "bytes", "bits_per_byte", "byte_ppl",
        "documents", "skipped_documents" (fewer than 2 tokens: nothing to score), "windows", "max_length",
        "stride"}``.

    Raises:
        ValueError: bad window sizes, a tokenizer that does not match the model or has no offsets (or no bos /
            eos token when asked for), or no token to score at all.
    """
    check_tokenizer(model, tokenizer)
    if max_length is None:
        max_length = min(int(getattr(model.config, "max_position_embeddings", None) or 1024), 1024)
    stride = max_length if stride is None else stride
    window_bounds(0, max_length, stride)  # validates the sizes before any work
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("perplexity needs a fast tokenizer (tokenizer.json): byte counts use its offsets")
    prefix = _special_id(tokenizer, "bos") if add_bos else None
    suffix = _special_id(tokenizer, "eos") if add_eos else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    bar = _progress(texts, progress)
    totals = {"nll_sum": 0.0, "tokens": 0, "bytes": 0, "documents": 0, "skipped_documents": 0, "windows": 0}
    was_training = model.training
    model.eval()
    try:
        it = iter(texts)
        while chunk := list(islice(it, 64 * batch_size)):
            enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            windows: list[Window] = []
            for text, ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"], strict=True):
                full = ([prefix] if prefix is not None else []) + list(ids) + ([suffix] if suffix is not None else [])
                doc = document_windows(
                    full,
                    token_bytes(text, offsets),
                    max_length,
                    stride,
                    prefix=int(prefix is not None),
                    suffix=int(suffix is not None),
                )
                totals["documents" if doc else "skipped_documents"] += 1
                windows.extend(doc)
            for batch in _batches(windows, batch_size):
                nll, n = score_windows(model, batch, pad_id)
                totals["nll_sum"] += nll
                totals["tokens"] += n
                totals["bytes"] += sum(w.n_bytes for w in batch)
            totals["windows"] += len(windows)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if totals["tokens"] == 0:
        raise ValueError(f"no tokens to score: {totals['skipped_documents']} documents, none with at least two tokens")
    return summarise(totals, max_length=max_length, stride=stride)


def summarise(totals: dict[str, Any], *, max_length: int, stride: int) -> dict[str, Any]:
    """The result dict from summed NLL, token and byte counts (see :func:`perplexity`)."""
    nll_sum, tokens, n_bytes = totals["nll_sum"], totals["tokens"], totals["bytes"]
    return {
        "ppl": math.exp(nll_sum / tokens),
        "nll": nll_sum / tokens,
        "nll_sum": nll_sum,
        "tokens": tokens,
        "bytes": n_bytes,
        "bits_per_byte": nll_sum / (math.log(2) * n_bytes) if n_bytes else float("nan"),
        "byte_ppl": math.exp(nll_sum / n_bytes) if n_bytes else float("nan"),
        "documents": totals["documents"],
        "skipped_documents": totals["skipped_documents"],
        "windows": totals["windows"],
        "max_length": max_length,
        "stride": stride,
    }


def _special_id(tokenizer: PreTrainedTokenizerBase, which: str) -> int:
    value = getattr(tokenizer, f"{which}_token_id")
    if value is None:
        raise ValueError(f"add_{which} needs a tokenizer with a {which} token; this one has none")
    return int(value)


def _progress(texts: Iterable[str], enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=len(texts) if hasattr(texts, "__len__") else None, unit="doc", desc="perplexity")


class JsonlTexts:
    """The ``field`` strings of a JSONL file: checked in full when built, then streamed (sized, re-iterable).

    Blank lines are skipped; ``limit`` keeps the first ``limit`` documents.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed line (:class:`~myllm.data.io.JsonlError`, naming file and line), or no documents.
    """

    def __init__(self, path: str | os.PathLike, field: str = "text", *, limit: int | None = None) -> None:
        self.path, self.field = Path(path), field
        if not self.path.is_file():
            raise FileNotFoundError(f"data file not found: {self.path}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        n = 0
        for _ in iter_jsonl(self.path, field):
            n += 1
            if n == limit:
                break
        if n == 0:
            raise ValueError(f"{self.path} holds no documents (an empty file or only blank lines)")
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[str]:
        for _, text in islice(iter_jsonl(self.path, self.field), self.n):
            yield text
