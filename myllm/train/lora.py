"""LoRA through PEFT for any objective: wrap the student, train only the adapters, save adapter and/or merged.

Targets are checked before PEFT sees them: every ``target_modules`` entry (a name, or a ``.``-suffix of module
names) and every ``target_parameters`` entry (``module.param`` suffix, e.g. ``mlp.experts.gate_up_proj``) must
match something in the model, else a ``ValueError`` lists what exists. (PEFT itself only warns about unmatched
``target_parameters`` and fails on ``target_modules`` only when *nothing* matches.)
"""

from __future__ import annotations

import re
from pathlib import Path

import peft
from torch import nn

from myllm.train.config import LoraSpec


def _suffix_match(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _leaf_names(names: list[str], parts: int = 1) -> str:
    leaves = sorted({".".join(n.split(".")[-parts:]) for n in names if n})
    return ", ".join(leaves[:30]) + (" ..." if len(leaves) > 30 else "")


def check_targets(model: nn.Module, spec: LoraSpec) -> None:
    """Raise ``ValueError`` when a LoRA target matches nothing in ``model``."""
    modules = [n for n, _ in model.named_modules() if n]
    targets = spec.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        if not any(re.fullmatch(targets, n) for n in modules):
            raise ValueError(
                f"lora.target_modules regex {targets!r} matches no module; module names end in: {_leaf_names(modules)}"
            )
    elif isinstance(targets, list):
        missing = [t for t in targets if not any(_suffix_match(n, t) for n in modules)]
        if missing:
            raise ValueError(
                f"lora.target_modules {missing} match no module; module names end in: {_leaf_names(modules)}"
            )
    params = [n for n, _ in model.named_parameters()]
    missing = [t for t in spec.target_parameters or [] if not any(_suffix_match(n, t) for n in params)]
    if missing:
        raise ValueError(
            f"lora.target_parameters {missing} match no parameter; parameters end in: {_leaf_names(params, parts=2)}"
        )


def lora_config(spec: LoraSpec) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        target_parameters=spec.target_parameters,
        task_type="CAUSAL_LM",
    )


def apply_lora(model: nn.Module, spec: LoraSpec) -> peft.PeftModel:
    """Wrap ``model`` with fresh LoRA adapters; only adapter weights stay trainable."""
    check_targets(model, spec)
    return peft.get_peft_model(model, lora_config(spec))


def save_lora(model: peft.PeftModel, spec: LoraSpec, *, adapter_dir: Path, merged_dir: Path) -> dict[str, Path]:
    """Write the PEFT adapter to ``adapter_dir`` and/or the merged plain HF model to ``merged_dir``
    (``spec.save``). Merging modifies ``model`` (it is the end of training). Returns what was written, by kind."""
    written: dict[str, Path] = {}
    if spec.save in ("adapter", "both"):
        model.save_pretrained(adapter_dir)
        written["adapter"] = adapter_dir
    if spec.save in ("merged", "both"):
        model.merge_and_unload().save_pretrained(merged_dir)
        written["merged"] = merged_dir
    return written
