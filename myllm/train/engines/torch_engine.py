"""The default engine: one process, CPU or one GPU, AdamW, optional bf16 autocast.

Checkpoint files: ``model.safetensors`` (trainable parameters and buffers of the trained module - frozen base
weights come back from the model source, which the fingerprint pins) and ``optimizer.pt`` (optimizer and
schedule state, loaded with ``weights_only=True``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from myllm.train.config import RunConfig
from myllm.train.engines.base import Engine
from myllm.train.objectives import Batch, Metrics, StepCounts
from myllm.train.optim import build_optimizer, build_schedule

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.pt"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and persistent buffers of ``module`` (each tensor once), detached on CPU."""
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    return {
        k: v.detach().cpu().contiguous() for k, v in module.state_dict().items() if k in trainable or k not in params
    }


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load :func:`trainable_state` output; every saved key must exist and every trainable tensor be covered."""
    own = module.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(trainable_state(module)) - set(state))
    if unexpected or missing:
        raise ValueError(
            f"checkpoint {source} does not fit this model: unexpected {unexpected[:5]}, missing {missing[:5]}"
        )
    module.load_state_dict(state, strict=False)


class TorchEngine(Engine):
    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.device = resolve_device(cfg.engine.device)
        self.bf16 = use_bf16(cfg.engine.precision, self.device)
        if self.bf16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision bf16 requested but this GPU does not support bfloat16")

    def prepare(self, module: nn.Module) -> None:
        self.module = module.to(self.device)
        self.optimizer = build_optimizer(module, self.cfg.optimizer)
        self.scheduler = build_schedule(self.optimizer, self.cfg.schedule, self.cfg.train.max_steps)
        self._params = [p for p in module.parameters() if p.requires_grad]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, batch: Batch, counts: StepCounts) -> tuple[torch.Tensor, Metrics]:
        with self._autocast():
            return self.module(batch, counts)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor | None:
        clip = self.cfg.train.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self._params, clip) if clip else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, directory: Path) -> None:
        safetensors.torch.save_file(trainable_state(self.module), str(directory / MODEL_FILE))
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            directory / OPTIM_FILE,
        )

    def load(self, directory: Path) -> None:
        for name in (MODEL_FILE, OPTIM_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"checkpoint {directory} has no {name} (written by another engine?)")
        state = safetensors.torch.load_file(str(directory / MODEL_FILE), device=str(self.device))
        load_trainable_state(self.module, state, directory)
        extra = torch.load(directory / OPTIM_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()
