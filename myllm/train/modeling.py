"""Loading the models and tokenizer a run needs: the student, the optional teacher, their checks.

A model comes from a local HF directory or from an inline HF config dict (``model_type`` plus fields, any type
registered with ``transformers.AutoConfig``, including myllm's own once imported); an inline model is
initialised from the run's seed. No hub downloads, no remote code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

import myllm  # noqa: F401  (registers myllm's model types with the Auto classes)
from myllm.data import load_tokenizer
from myllm.train.config import ModelSpec


def load_model(spec: ModelSpec, *, seed: int, attn_implementation: str | None = None) -> transformers.PreTrainedModel:
    """The causal LM described by ``spec`` (float dtype from ``spec.dtype``), on CPU."""
    kwargs: dict[str, Any] = {"dtype": getattr(torch, spec.dtype)}
    attn = attn_implementation or spec.attn_implementation
    if attn:
        kwargs["attn_implementation"] = attn
    if spec.path is not None:
        if not (Path(spec.path) / "config.json").is_file():
            raise FileNotFoundError(f"model directory not found or without config.json: {spec.path}")
        return transformers.AutoModelForCausalLM.from_pretrained(spec.path, **kwargs)
    raw = dict(spec.config or {})
    model_type = raw.pop("model_type")
    try:
        config = transformers.AutoConfig.for_model(model_type, **raw)
    except ValueError as exc:
        raise ValueError(f"inline model config: {exc}") from None
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, **kwargs)


def vocab_size(model: nn.Module) -> int:
    """Number of logits the model produces per token."""
    return int(model.config.get_text_config().vocab_size)


def check_teacher(student: nn.Module, teacher: nn.Module, tokenizer: Any, teacher_tokenizer_path: str | None) -> None:
    """Logit distillation needs one token space: equal vocabulary sizes and, where the teacher ships a
    tokenizer, the same token -> id mapping. Raises ``ValueError`` naming the difference."""
    vs, vt = vocab_size(student), vocab_size(teacher)
    if vs != vt:
        raise ValueError(
            f"teacher vocabulary ({vt} tokens) differs from the student's ({vs}); logit distillation needs the "
            "same tokenizer"
        )
    if teacher_tokenizer_path is None or not Path(teacher_tokenizer_path).is_dir():
        return
    if not any((Path(teacher_tokenizer_path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return
    t_vocab = load_tokenizer(teacher_tokenizer_path).get_vocab()
    s_vocab = tokenizer.get_vocab()
    if t_vocab != s_vocab:
        diff = sorted(set(t_vocab.items()) ^ set(s_vocab.items()))[:5]
        raise ValueError(
            f"teacher tokenizer differs from the student's (e.g. {diff}); distillation needs the same one"
        )


def fingerprint(module: nn.Module) -> str:
    """A short hash of the model type and every parameter's name and shape: two runs whose checkpoints may be
    exchanged have the same fingerprint."""
    config = getattr(module, "config", None) or getattr(getattr(module, "model", None), "config", None)
    model_type = getattr(config, "model_type", type(module).__name__)
    shapes = [(n, list(_full_shape(p))) for n, p in module.named_parameters()]
    blob = json.dumps({"model_type": model_type, "params": shapes}, sort_keys=True).encode()
    return f"{model_type}-{hashlib.sha256(blob).hexdigest()[:16]}"


def _full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's shape, also when ZeRO-3 has partitioned it (``ds_shape``)."""
    return getattr(p, "ds_shape", p.shape)
