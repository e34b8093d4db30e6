"""What the training loop asks of an engine (plain PyTorch or DeepSpeed).

Per optimizer step the loop calls, for each micro-batch, ``loss, metrics = forward(batch, counts)`` and
``backward(loss)``, then ``step()`` once. The loss is already normalised for the whole step (see
``objectives.StepCounts``): an engine must neither divide it by the accumulation steps nor scale it otherwise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from myllm.train.config import RunConfig
from myllm.train.objectives import Batch, Metrics, StepCounts


class Engine(ABC):
    """Owns the device, the optimizer, the schedule and (for DeepSpeed) the process group."""

    rank: int = 0
    world_size: int = 1
    device: torch.device
    module: nn.Module

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def before_model_load(self) -> None:
        """Hook called right before the student is built (ZeRO-3 partitions it while it loads)."""
        return None

    @property
    def partitioned(self) -> bool:
        """True when no rank holds the full parameters (ZeRO-3)."""
        return False

    @abstractmethod
    def prepare(self, module: nn.Module) -> None:
        """Place ``module`` (the ``TrainModule``) and build the optimizer and the schedule."""

    @abstractmethod
    def forward(self, batch: Batch, counts: StepCounts) -> tuple[torch.Tensor, Metrics]:
        """One micro-batch's loss and metrics."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one micro-batch's loss."""

    @abstractmethod
    def step(self) -> torch.Tensor | float | None:
        """Clip, update, advance the schedule, zero the gradients; returns the gradient norm if known."""

    @abstractmethod
    def lr(self) -> float:
        """The learning rate the next optimizer step will use."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write model, optimizer and schedule state into ``directory`` (collective)."""

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Restore what :meth:`save` wrote (collective)."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The module's full state dict on rank 0 (gathered under ZeRO-3; collective), ``None`` elsewhere."""

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the data-parallel ranks (identity in one process)."""
        return t

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        return None

    def close(self) -> None:
        """Release process-level resources."""
        return None
