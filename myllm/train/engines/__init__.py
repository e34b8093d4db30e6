"""Engines run the loop's forward/backward/step: ``torch`` (default) and ``deepspeed``."""

from __future__ import annotations

from collections.abc import Callable

from myllm.train.config import RunConfig
from myllm.train.engines.base import Engine


def _torch(cfg: RunConfig) -> Engine:
    from myllm.train.engines.torch_engine import TorchEngine

    return TorchEngine(cfg)


def _deepspeed(cfg: RunConfig) -> Engine:
    from myllm.train.engines.deepspeed_engine import DeepSpeedEngine  # imports deepspeed only when asked for

    return DeepSpeedEngine(cfg)


# engine.kind -> constructor
ENGINES: dict[str, Callable[[RunConfig], Engine]] = {"torch": _torch, "deepspeed": _deepspeed}


def build_engine(cfg: RunConfig) -> Engine:
    return ENGINES[cfg.engine.kind](cfg)


__all__ = ["ENGINES", "Engine", "build_engine"]
