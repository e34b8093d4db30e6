"""The DeepSpeed engine: ZeRO 0-3 over data-parallel processes (gloo on CPU, nccl on GPUs), bf16 on GPU.

Launch with ``torchrun --nproc_per_node N -m myllm train run.yaml`` or ``deepspeed --num_gpus N --no_local_rank
--module myllm train run.yaml`` (the rank comes from the environment); without a launcher it runs as a
one-process group. The DeepSpeed config is built from the run
config, or merged into a user's JSON (``engine.deepspeed_config``): the run config fills keys the JSON leaves out
or sets to ``"auto"``; a key both set differently is an error. The optimizer and schedule always come from the run
config (a client AdamW and transformers schedule), so every engine optimises the same way.

The loop's losses are normalised for the whole step, so ``backward`` runs with ``scale_wrt_gas=False``.
DeepSpeed averages gradients over ranks; ``StepCounts.items`` is divided by the world size to compensate.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from myllm.train.config import RunConfig
from myllm.train.engines.base import Engine
from myllm.train.engines.torch_engine import use_bf16
from myllm.train.objectives import Batch, Metrics, StepCounts
from myllm.train.optim import build_optimizer, build_schedule

TAG = "deepspeed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_user_config(value: str | dict[str, Any] | None) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return json.loads(json.dumps(value))
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid DeepSpeed JSON ({exc})") from None


def _merge(user: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` to ``value`` unless the user set it (``"auto"`` counts as unset); conflicts raise."""
    *parents, leaf = key.split(".")
    node = user
    for part in parents:
        node = node.setdefault(part, {})
    current = node.get(leaf, "auto")
    if current == "auto":
        node[leaf] = value
    elif current != value:
        raise ValueError(f"DeepSpeed config sets {key}={current!r} but the run config implies {value!r}")


def build_ds_config(cfg: RunConfig, world_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config of a run (see the module docstring for how a user JSON is merged)."""
    ds = _read_user_config(cfg.engine.deepspeed_config)
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ValueError(
                f"DeepSpeed config has an {section!r} section; the optimizer and schedule come from the run config "
                "(optimizer:, schedule:) - remove it"
            )
    t = cfg.train
    _merge(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size)
    _merge(ds, "gradient_accumulation_steps", t.grad_accum)
    _merge(ds, "train_batch_size", t.micro_batch_size * t.grad_accum * world_size)
    _merge(ds, "gradient_clipping", float(t.grad_clip or 0.0))
    stage = cfg.engine.zero_stage
    if stage is None:
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        stage = 0 if stage == "auto" else stage
    _merge(ds, "zero_optimization.stage", stage)
    _merge(ds, "bf16.enabled", bf16)
    ds.setdefault("steps_per_print", 10**12)  # the loop logs; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    if ds["zero_optimization"]["stage"] not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage must be 0-3, got {ds['zero_optimization']['stage']!r}")
    return ds


class DeepSpeedEngine(Engine):
    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        import deepspeed

        self._ds_lib = deepspeed
        cuda = torch.cuda.is_available() and cfg.engine.device != "cpu"
        if not dist.is_initialized():
            if "RANK" not in os.environ:  # no launcher: a one-process group, as `deepspeed --num_gpus 1` would make
                for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
                    os.environ.setdefault(k, v)
                os.environ.setdefault("MASTER_PORT", str(_free_port()))
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.bf16 = use_bf16(cfg.engine.precision, self.device)
        self.ds_config = build_ds_config(cfg, self.world_size, self.bf16)
        self.stage = int(self.ds_config["zero_optimization"]["stage"])
        self._hf_ds_config = None

    @property
    def partitioned(self) -> bool:
        return self.stage == 3

    def before_model_load(self) -> None:
        if self.stage == 3:  # from_pretrained / from_config then build the model partitioned (zero.Init)
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)

    def prepare(self, module: nn.Module) -> None:
        optimizer = build_optimizer(module, self.cfg.optimizer)
        scheduler = build_schedule(optimizer, self.cfg.schedule, self.cfg.train.max_steps)
        self.ds, self.optimizer, _, self.scheduler = self._ds_lib.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config, dist_init_required=False
        )
        self.module = self.ds.module
        self._frozen = any(not p.requires_grad for p in module.parameters())

    def forward(self, batch: Batch, counts: StepCounts) -> tuple[torch.Tensor, Metrics]:
        return self.ds(batch, counts)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed also hooks the forward outputs to divide their gradient by the accumulation steps unless the
        # backward pass is already registered as the engine's; those hooks fire before the engine's own hook when
        # the forward output itself is backpropagated (0.19.8 then divides despite scale_wrt_gas=False). A fresh
        # node on top lets the engine's hook run first, so the step-normalised loss is used as is (tested against
        # the torch engine with accumulation and clipping).
        self.ds.backward(loss.clone(), scale_wrt_gas=False)
        self.ds.step()  # updates only at the accumulation boundary

    def step(self) -> float | None:
        if not self.ds.was_step_applied():
            raise RuntimeError("DeepSpeed did not apply the optimizer step at the accumulation boundary")
        return self.ds.get_global_grad_norm()

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, directory: Path) -> None:
        self.ds.save_checkpoint(str(directory), tag=TAG, exclude_frozen_parameters=self._frozen)

    def load(self, directory: Path) -> None:
        if not (directory / TAG).is_dir():
            raise FileNotFoundError(f"checkpoint {directory} has no DeepSpeed state (written by another engine?)")
        path, _ = self.ds.load_checkpoint(str(directory), tag=TAG, load_module_strict=not self._frozen)
        if path is None:
            raise ValueError(f"DeepSpeed could not load the checkpoint in {directory}")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.stage != 3:
            return self.module.state_dict() if self.rank == 0 else None
        state: dict[str, torch.Tensor] = {}
        for prefix, mod in self.module.named_modules():
            own = list(mod.parameters(recurse=False))
            with self._ds_lib.zero.GatheredParameters(own, modifier_rank=None):  # one module at a time
                if self.rank == 0:
                    for name, p in mod.named_parameters(recurse=False):
                        state[f"{prefix}.{name}" if prefix else name] = p.detach().cpu().clone()
            if self.rank == 0:
                for name, b in mod.named_buffers(recurse=False):
                    if name not in mod._non_persistent_buffers_set:
                        state[f"{prefix}.{name}" if prefix else name] = b.detach().cpu().clone()
        return state if self.rank == 0 else None

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if self._hf_ds_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._hf_ds_config = None
