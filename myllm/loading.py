"""Loading a local causal LM and its tokenizer for evaluation and generation, with clear errors.

Every command that takes ``MODEL`` (``myllm eval ppl``, ``myllm generate``) goes through here:

* :func:`load_causal_lm` - a local HF model directory -> ``AutoModelForCausalLM`` (myllm's own types included),
  refusing directories that are not models and checkpoints whose weights do not fill the model (transformers
  would otherwise initialise the missing tensors at random and carry on);
* :func:`load_model_and_tokenizer` - the model plus its tokenizer (from ``tokenizer`` or the model directory),
  checked against each other by :func:`check_tokenizer`.

Never downloads and never runs remote code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from myllm.data.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""Files one of which a loadable model directory holds (``save_pretrained`` writes the first two)."""

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; anything else as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_model_dir(path: str | os.PathLike) -> Path:
    """Check that ``path`` looks like a saved HF model (``config.json`` and a weights file) before loading it.

    Raises:
        ValueError: missing, a file, no ``config.json``, or no weights file.
    """
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"model {p} is {'a file' if p.exists() else 'missing'}; expected a local model directory")
    if not (p / "config.json").is_file():
        raise ValueError(f"{p} is not a model directory: no config.json (save one with model.save_pretrained)")
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        raise ValueError(f"{p} is not a model directory: no weights ({', '.join(WEIGHT_FILES)})")
    return p


def load_causal_lm(
    path: str | os.PathLike, *, dtype: str = "float32", device: str | torch.device | None = "cpu"
) -> PreTrainedModel:
    """Load a causal LM from a local directory in eval mode.

    Args:
        path: a directory written by ``save_pretrained`` (any architecture registered with
            ``AutoModelForCausalLM``; importing myllm registers its own).
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: where the model goes (``"auto"``: CUDA when available).

    Raises:
        ValueError: not a model directory, an unreadable config or weights, or a checkpoint that leaves model
            tensors missing or has tensors of the wrong shape (the message names them).
    """
    import transformers

    import myllm  # noqa: F401  (registers myllm's model types with the Auto classes)

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    p = check_model_dir(path)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(p), dtype=DTYPES[dtype], local_files_only=True, trust_remote_code=False, output_loading_info=True
        )
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, safetensors errors ...
        raise ValueError(f"{p} cannot be loaded as a causal LM: {type(exc).__name__}: {exc}") from exc
    problems = [
        f"{k.replace('_', ' ')} {sorted(map(str, info[k]))[:5]}"
        for k in ("missing_keys", "mismatched_keys")
        if info.get(k)
    ]
    problems += [str(msg) for msg in info.get("error_msgs") or ()]
    if problems:
        raise ValueError(
            f"{p}: the checkpoint does not fill the model ({'; '.join(problems)}); "
            "refusing to run with randomly initialised tensors"
        )
    return model.to(resolve_device(device)).eval()


def model_vocab_size(model: torch.nn.Module) -> int:
    """Number of logits per token: the output embedding's rows, else the (text) config's ``vocab_size``."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(out, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def check_tokenizer(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer that cannot belong to ``model``: more tokens (or a special-token id) than logits.

    Raises:
        ValueError: naming both sizes.
    """
    vocab = model_vocab_size(model)
    specials = [i for i in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None]
    if len(tokenizer) > vocab or any(i >= vocab for i in specials):
        raise ValueError(
            f"the tokenizer ({len(tokenizer)} tokens) does not match the model ({vocab} logits per token): "
            "pass the tokenizer the model was trained with"
        )


def load_model_and_tokenizer(
    path: str | os.PathLike,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None,
    *,
    dtype: str = "float32",
    device: str | torch.device | None = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model in ``path`` and its tokenizer (``tokenizer``, else the one saved in ``path``), checked together.

    A tokenizer given explicitly must have the same vocabulary as one saved with the model, if there is one.

    Raises:
        ValueError: see :func:`load_causal_lm`, :func:`check_tokenizer`; no tokenizer found; a tokenizer whose
            vocabulary differs from the model directory's own.
    """
    p = check_model_dir(path)
    saved = _saved_tokenizer(p)
    if tokenizer is None:
        if saved is None:
            raise ValueError(f"{p} holds no tokenizer; pass one (--tokenizer DIR)")
        tok = saved
    else:
        tok = load_tokenizer(tokenizer)
        if saved is not None and saved.get_vocab() != tok.get_vocab():
            raise ValueError(
                f"the tokenizer given differs from the one saved with the model in {p} "
                f"({len(tok)} vs {len(saved)} tokens, different vocabulary)"
            )
    model = load_causal_lm(p, dtype=dtype, device=device)
    check_tokenizer(model, tok)
    return model, tok


def _saved_tokenizer(path: Path) -> Any:
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    return load_tokenizer(path)
