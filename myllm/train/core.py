"""The training loop: one loop for every objective and engine.

Per optimizer step: take ``grad_accum`` micro-batches, count their target tokens (all-reduced across ranks), run
forward/backward on each with the loss normalised by that count, step once, then log, checkpoint and call the
callbacks. Everything that can be wrong with the input (config, data, tokenizer, teacher, LoRA targets, the
checkpoint to resume) is checked in :class:`Trainer`'s constructor, before the first step.

Public entry points::

    from myllm.train import Trainer, load_config, train
    result = train("run.yaml")                 # build, resume if possible, train, export; a TrainResult
    trainer = Trainer(load_config("run.yaml")) # or step by step: trainer.fit(steps=100); trainer.export()
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn

from myllm.blocks.ffn.moe import expert_load, update_router_bias
from myllm.blocks.ffn.moe.balance import max_vio
from myllm.data import WindowSource, load_tokenizer
from myllm.data.io import replace_dir
from myllm.factory.recipe import surgeries
from myllm.surgery.experts import freeze_recorded_experts
from myllm.train import checkpoint as ckpt_io
from myllm.train.config import RunConfig, load_config
from myllm.train.data import build_source, collate, pad_id
from myllm.train.engines import build_engine
from myllm.train.lora import apply_lora, lora_config, save_lora
from myllm.train.losses import IGNORE
from myllm.train.metrics import MetricsWriter, Progress
from myllm.train.modeling import check_teacher, fingerprint, load_model, vocab_size
from myllm.train.objectives import Batch, CausalLM, Distill, Objective, StepCounts

Callback = Callable[["Trainer"], None]


class TrainModule(nn.Module):
    """The trained unit: ``model`` plus the objective's trainable ``extras``; ``forward`` returns the loss.

    The objective (and a distillation teacher inside it) is a plain attribute, so it is neither trained nor saved.
    """

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.extras = nn.ModuleDict(objective.extra_modules(model))
        self.__dict__["objective"] = objective

    def forward(self, batch: Batch, counts: StepCounts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.objective.loss(self, batch, counts)


@dataclass
class TrainResult:
    """What a run produced. ``final_dir``: plain HF model (safetensors) + tokenizer; ``adapter_dir``: LoRA adapter."""

    output_dir: Path
    step: int
    metrics_file: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    final_dir: Path | None = None
    adapter_dir: Path | None = None
    rank: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _build_objective(cfg: RunConfig, teacher: nn.Module | None) -> Objective:
    if cfg.objective.kind == "distill":
        return Distill(cfg.objective, teacher)
    return CausalLM(cfg.objective.kind)


class Trainer:
    """Builds and validates everything for one run, then trains it (see the module docstring).

    Args:
        cfg: the run.
        callbacks: called as ``callback(trainer)`` after every optimizer step.
        source: a ready :class:`~myllm.data.source.WindowSource` (e.g. ``myllm.data.source_from_dataset`` for a
            ``datasets.Dataset``) used instead of ``cfg.data``'s files; it must serve this process's rank.
        model: a ready causal LM trained (in place) instead of loading ``cfg.model``, which still names the
            tokenizer: e.g. one just changed by ``myllm.factory.replace`` or ``myllm.surgery.add_experts``, whose
            frozen expert rows are not saved with a checkpoint. Not with a partitioning engine (ZeRO-3), which
            must build the model itself.
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        callbacks: Sequence[Callback] = (),
        source: WindowSource | None = None,
        model: nn.Module | None = None,
    ) -> None:
        self.cfg, self.callbacks = cfg, list(callbacks)
        self.output_dir = Path(cfg.output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        seed_everything(cfg.train.seed)
        self.engine = build_engine(cfg)
        self.rank, self.world_size = self.engine.rank, self.engine.world_size
        try:
            self._build(source, model)
        except BaseException:
            self.engine.close()  # e.g. stop ZeRO-3 partitioning models built later in this process
            raise

    def _build(self, source: WindowSource | None, given: nn.Module | None) -> None:
        cfg = self.cfg
        if given is not None and self.engine.partitioned:
            raise ValueError(
                "a ready model cannot be trained with ZeRO-3 (the engine builds the model partitioned itself); "
                "save it and give its directory as model.path, or use ZeRO stage 0-2"
            )
        # cheap checks first: tokenizer and data
        self.tokenizer = load_tokenizer(cfg.model.tokenizer_path())
        self.pad_id = pad_id(self.tokenizer)
        if source is not None and not isinstance(source, WindowSource):
            raise TypeError("source must implement WindowSource (seq_len, __iter__, state_dict, load_state_dict)")
        if source is None:
            source = build_source(cfg, self.tokenizer, rank=self.rank, world_size=self.world_size)
        self.source = source

        # models: the teacher before ZeRO-3's partitioned loading applies to what follows
        distill = cfg.objective.kind == "distill"
        attn = "eager" if distill and cfg.objective.attention_layers else None  # attention maps need eager
        teacher = load_model(cfg.objective.teacher, seed=cfg.train.seed, attn_implementation=attn) if distill else None
        self.engine.before_model_load()
        self.frozen_experts: dict[str, int] = {}  # MoE block path -> expert rows kept frozen
        if given is None:
            model = load_model(cfg.model, seed=cfg.train.seed, attn_implementation=attn)
            if cfg.lora is None:  # (LoRA freezes the whole base model anyway)
                self.frozen_experts = self._refreeze_added_experts(model)
        else:
            model = given
            if attn is not None:
                model.set_attn_implementation(attn)
        if len(self.tokenizer) > vocab_size(model):
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary is {vocab_size(model)}"
            )
        if teacher is not None:
            teacher_tok = cfg.objective.teacher.tokenizer_path()
            check_teacher(model, teacher, self.tokenizer, teacher_tok)
        if cfg.lora is not None:
            model = apply_lora(model, cfg.lora)
        self.objective = _build_objective(cfg, teacher)
        if isinstance(self.objective, Distill):
            self.objective.validate(model)
        self.module = TrainModule(model, self.objective)
        self.fingerprint = fingerprint(self.module)
        resume_from = self._resume_target()  # refuses a checkpoint of another model before anything runs

        self.objective.to(self.engine.device)
        self.engine.prepare(self.module)
        self.step, self.tokens = 0, 0
        self.history: list[dict[str, Any]] = []
        self.metrics = MetricsWriter(self.output_dir / cfg.logging.metrics_file, enabled=self.rank == 0)
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt_io.clean_partial(self.ckpt_root)
        if resume_from is not None:
            self._load(resume_from)
        self.metrics.truncate_after(self.step)
        self._windows: Iterator = iter(self.source)
        self.finished = False

    def _refreeze_added_experts(self, model: nn.Module) -> dict[str, int]:
        """Old experts that ``add_experts(freeze_existing=True)`` froze stay frozen (row freezing is not saved)."""
        recorded = [e for e in surgeries(model.config) if e.get("op") == "add_experts" and e.get("freeze_existing")]
        if recorded and self.cfg.engine.kind != "torch":
            raise ValueError(
                "this model holds experts added with freeze_existing=True; their row freezing works with torch "
                "optimizers only (DeepSpeed keeps its own master weights). Train it with engine.kind: torch, or "
                "with LoRA"
            )
        return freeze_recorded_experts(model)

    # ----------------------------------------------------------------------------------------------- resume
    def _resume_target(self) -> Path | None:
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            return None
        path = ckpt_io.find_latest(self.ckpt_root) if resume == "auto" else Path(resume)
        if path is None:
            return None
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint to resume not found: {path}")
        state = ckpt_io.read_state(path)
        if state.get("model_fingerprint") != self.fingerprint:
            raise ValueError(
                f"checkpoint {path} was written for a different model ({state.get('model_fingerprint')}); this run's "
                f"model is {self.fingerprint}. Use another output_dir or checkpoint.resume: never"
            )
        if state.get("engine") != self.cfg.engine.kind:
            raise ValueError(
                f"checkpoint {path} was written by the {state.get('engine')} engine, not {self.cfg.engine.kind}"
            )
        return path

    def _load(self, path: Path) -> None:
        state = ckpt_io.read_state(path)
        self.engine.load(path)
        rank_state = ckpt_io.load_rank_state(path, self.rank)
        self.source.load_state_dict(rank_state["data"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])

    def save_checkpoint(self) -> Path:
        """Write an atomic checkpoint of the current step (collective over ranks)."""
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "model_fingerprint": self.fingerprint,
            "engine": self.cfg.engine.kind,
            "world_size": self.world_size,
        }
        return ckpt_io.save(
            self.ckpt_root,
            self.step,
            write_engine=self.engine.save,
            trainer_state=state,
            rank_state={"data": self.source.state_dict()},
            rank=self.rank,
            barrier=self.engine.barrier,
            keep_last=self.cfg.checkpoint.keep_last,
        )

    # ------------------------------------------------------------------------------------------------- loop
    def _next_batch(self) -> Batch:
        """The next micro-batch, collated on the CPU."""
        return collate([next(self._windows) for _ in range(self.cfg.train.micro_batch_size)], self.pad_id)

    def _counts(self, micro: list[Batch]) -> tuple[StepCounts, int]:
        """The step's normalisers from its CPU micro-batches (all-reduced over ranks), and its real-token count.

        Counting on the CPU keeps a one-process step free of device synchronisation.
        """
        items = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
        tokens = sum(
            int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in micro
        )
        if self.world_size > 1:
            local = torch.tensor([items, tokens], dtype=torch.float64, device=self.engine.device)
            items, tokens = (int(v) for v in self.engine.all_reduce_sum(local).tolist())
        # an all-ignored step trains on nothing instead of dividing by zero
        norm = torch.tensor([max(items, 1), max(tokens, 1)], dtype=torch.float32) / self.world_size
        norm = norm.to(self.engine.device, non_blocking=True)
        return StepCounts(items=norm[0], tokens=norm[1], micro_batches=len(micro)), tokens

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}

    def _log_record(
        self,
        loss: torch.Tensor,
        metrics: dict[str, torch.Tensor],
        lr: float,
        grad_norm: Any,
        step_tokens: int,
        dt: float,
        loads: dict[str, torch.Tensor],
    ) -> dict[str, Any]:
        names = sorted(metrics)
        vals = self.engine.all_reduce_sum(torch.stack([loss, *[metrics[n] for n in names]]).float()) / self.world_size
        vals = vals.tolist()  # one device synchronisation per logged step
        record = {"step": self.step, "loss": vals[0]}
        record.update(zip(names, vals[1:], strict=True))
        record.update(
            lr=lr,
            grad_norm=None if grad_norm is None else float(grad_norm),
            tokens=self.tokens,
            tokens_per_s=step_tokens / max(dt, 1e-9),
        )
        if loads:  # MoE: tokens per expert of this step, summed over micro-batches and ranks
            layers = list(loads)
            total = self.engine.all_reduce_sum(torch.stack([loads[n] for n in layers]).to(self.engine.device))
            total = total.cpu()
            record["max_vio"] = max(max_vio(row) for row in total)
            record["expert_load"] = {n: [int(c) for c in row.tolist()] for n, row in zip(layers, total, strict=True)}
        return record

    def _add_expert_load(self, loads: dict[str, torch.Tensor]) -> None:
        """Add each MoE layer's tokens per expert ``[E]`` of the last forward to ``loads`` (layer -> int64)."""
        for name, entry in expert_load(self.module.model).items():
            counts = torch.tensor(entry["tokens_per_expert"], dtype=torch.int64)
            loads[name] = loads[name] + counts if name in loads else counts

    def train_step(self) -> dict[str, Any] | None:
        """One optimizer step; returns the logged record on logging steps, else ``None``."""
        t0 = time.perf_counter()
        micro = [self._next_batch() for _ in range(self.cfg.train.grad_accum)]
        counts, step_tokens = self._counts(micro)
        micro = [self._to_device(b) for b in micro]
        lr = self.engine.lr()
        logging = (self.step + 1) % self.cfg.logging.every == 0 or self.step + 1 == self.cfg.train.max_steps
        loss_sum: torch.Tensor | float = 0.0
        metric_sums: dict[str, torch.Tensor] = {}
        loads: dict[str, torch.Tensor] = {}
        for batch in micro:
            loss, metrics = self.engine.forward(batch, counts)
            self.engine.backward(loss)
            loss_sum = loss_sum + loss.detach()
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v
            if logging:
                self._add_expert_load(loads)
        grad_norm = self.engine.step()
        if self.cfg.lora is None:  # under LoRA the base model, router biases included, stays frozen
            update_router_bias(self.module.model)  # MoE aux-loss-free balancing (no-op without such routers)
        self.step += 1
        self.tokens += step_tokens
        record = None
        if logging:
            dt = time.perf_counter() - t0
            record = self._log_record(loss_sum, metric_sums, lr, grad_norm, step_tokens, dt, loads)
            self.metrics.write(record)
            self.history.append(record)
        every = self.cfg.checkpoint.every
        if every and self.step % every == 0:
            self.save_checkpoint()
        for cb in self.callbacks:
            cb(self)
        return record

    def fit(self, steps: int | None = None) -> list[dict[str, Any]]:
        """Train ``steps`` more optimizer steps (default: up to ``train.max_steps``); returns the logged records."""
        if self.finished:
            raise RuntimeError("this run was exported with its LoRA adapter merged; it cannot train further")
        target = self.cfg.train.max_steps if steps is None else min(self.cfg.train.max_steps, self.step + steps)
        first = len(self.history)
        self.module.train()
        progress = Progress(self.cfg.train.max_steps, self.step, enabled=self.rank == 0 and self.cfg.logging.progress)
        try:
            while self.step < target:
                progress.update(self.train_step())
        finally:
            progress.close()
        return self.history[first:]

    # ----------------------------------------------------------------------------------------------- export
    def _full_model(self) -> nn.Module | None:
        """The trained model (PEFT-wrapped under LoRA) with full weights, on rank 0; ``None`` on other ranks."""
        if not self.engine.partitioned:
            return self.module.model if self.rank == 0 else None
        state = self.engine.full_state_dict()  # collective
        self.engine.close()  # stop partitioning new models, so rank 0 can rebuild a plain one
        if self.rank != 0:
            return None
        live = self.module.model
        base_config = live.get_base_model().config if self.cfg.lora is not None else live.config
        model = transformers.AutoModelForCausalLM.from_config(base_config, dtype=getattr(torch, self.cfg.model.dtype))
        if self.cfg.lora is not None:
            import peft

            model = peft.get_peft_model(model, lora_config(self.cfg.lora))
        prefix = "model."
        model.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        return model

    def export(self) -> TrainResult:
        """Write the final model to ``output_dir/final`` (plain HF, safetensors, with the tokenizer) and, under
        LoRA, the adapter to ``output_dir/adapter``. Collective; atomic (temp dir then rename)."""
        model = self._full_model()
        result = TrainResult(self.output_dir, self.step, self.metrics.path, list(self.history), rank=self.rank)
        if self.rank == 0:
            final, adapter = self.output_dir / "final", self.output_dir / "adapter"
            tmp_final, tmp_adapter = self.output_dir / ".tmp-final", self.output_dir / ".tmp-adapter"
            for p in (tmp_final, tmp_adapter):
                shutil.rmtree(p, ignore_errors=True)
            if self.cfg.lora is not None:
                written = save_lora(model, self.cfg.lora, adapter_dir=tmp_adapter, merged_dir=tmp_final)
                self.finished = "merged" in written
            else:
                model.save_pretrained(tmp_final)
            for tmp, dst, attr in ((tmp_final, final, "final_dir"), (tmp_adapter, adapter, "adapter_dir")):
                if tmp.is_dir():
                    self.tokenizer.save_pretrained(tmp)
                    replace_dir(tmp, dst)
                    setattr(result, attr, dst)
        self.engine.barrier()
        return result

    def run(self) -> TrainResult:
        """Train to ``train.max_steps``, then export (``checkpoint.save_final``)."""
        self.fit()
        if self.cfg.checkpoint.save_final:
            return self.export()
        return TrainResult(self.output_dir, self.step, self.metrics.path, list(self.history), rank=self.rank)


def train(
    config: RunConfig | str | Path, *, callbacks: Sequence[Callback] = (), overrides: list[str] | None = None
) -> TrainResult:
    """Run a training job from a :class:`RunConfig` or a YAML/JSON file (``overrides``: ``key.path=value``)."""
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    return Trainer(cfg, callbacks=callbacks).run()
