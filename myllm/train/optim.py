"""Optimizer and learning-rate schedule of a run (transformers' schedules; no hand-written LR curves)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers
from torch import nn

from myllm.train.config import OptimizerSpec, ScheduleSpec


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices (decayed) and 1-D tensors - biases, norms - (not decayed)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(module: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(module, spec.weight_decay), lr=spec.lr, betas=spec.betas, eps=spec.eps)


def _cosine(opt: torch.optim.Optimizer, s: ScheduleSpec, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return transformers.get_cosine_with_min_lr_schedule_with_warmup(
        opt, num_warmup_steps=s.warmup_steps, num_training_steps=steps, min_lr_rate=s.min_lr_ratio
    )


def _wsd(opt: torch.optim.Optimizer, s: ScheduleSpec, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    decay = s.decay_steps if s.decay_steps is not None else max(1, round(0.1 * steps))
    decay = min(decay, steps - s.warmup_steps)
    return transformers.get_wsd_schedule(
        opt,
        num_warmup_steps=s.warmup_steps,
        num_decay_steps=decay,
        num_training_steps=steps,
        decay_type=s.decay_type,
        min_lr_ratio=s.min_lr_ratio,
    )


def _constant(opt: torch.optim.Optimizer, s: ScheduleSpec, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return transformers.get_constant_schedule_with_warmup(opt, num_warmup_steps=s.warmup_steps)


SCHEDULES: dict[str, Callable[..., torch.optim.lr_scheduler.LambdaLR]] = {
    "cosine": _cosine,
    "wsd": _wsd,
    "constant": _constant,
}


def build_schedule(
    optimizer: torch.optim.Optimizer, spec: ScheduleSpec, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule over ``max_steps`` optimizer steps; step it once per optimizer step."""
    return SCHEDULES[spec.kind](optimizer, spec, max_steps)
