"""Evaluation: perplexity and bits-per-byte on held-out text (``myllm eval ppl``).

* :func:`perplexity` - token-level perplexity with strided sliding windows (HF's convention) and
  tokenizer-independent bits-per-byte, on any iterable of texts;
* :class:`JsonlTexts` - the texts of a JSONL file, validated up front and streamed.
"""

from myllm.eval.perplexity import JsonlTexts, perplexity, window_bounds

__all__ = ["JsonlTexts", "perplexity", "window_bounds"]
