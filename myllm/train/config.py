"""One pydantic model per training run, loadable from YAML or JSON.

A run is described by :class:`RunConfig`: ``model``, ``data``, ``objective``, ``optimizer``, ``schedule``,
``engine``, ``lora``, ``train``, ``checkpoint``, ``logging`` and ``output_dir``. Every section forbids unknown
keys, so a typo is an error naming the field, not a silently ignored setting. Cross-section rules (ZeRO-3 needs
the DeepSpeed engine, SFT needs chat data, ...) are checked here, before anything is built.

Relative paths in a config *file* are resolved against the folder holding that file, so a config and its data
can move together. A minimal pretraining run::

    output_dir: runs/tiny
    model: {path: models/tiny-llama}          # or config: {model_type: llama, hidden_size: 64, ...}
    data: {path: data/corpus.jsonl, seq_len: 256}
    train: {max_steps: 1000, micro_batch_size: 8, grad_accum: 4}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """An invalid run configuration; the message names the file and every offending field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Section):
    """Where the model comes from: a local HF directory (``path``) or an inline HF config (``config``).

    ``config`` is a dict with ``model_type`` (any type registered with ``transformers.AutoConfig``, e.g.
    ``llama``, ``qwen2_moe`` or ``myllm``); the model is then initialised from the run's seed.
    """

    path: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = Field(None, description="tokenizer directory; defaults to `path`")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str | None = Field(None, description="e.g. sdpa or eager; attention KD forces eager")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of `path` (a local HF directory) or `config` (an inline HF config)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("an inline model `config` needs a `model_type` key (e.g. llama, qwen2, myllm)")
        return self

    def tokenizer_path(self) -> str | None:
        return self.tokenizer if self.tokenizer is not None else self.path


class DataSpec(_Section):
    """Training data.

    ``kind: jsonl`` reads small corpora into memory (``myllm.train.data``); ``format``: ``text`` (JSONL
    ``{"text": ...}``) or ``chat`` (JSONL ``{"conversations": [{"role", "content"}, ...]}``), by default from the
    objective (pretrain: text, sft: chat, distill: text). ``packing`` concatenates documents into ``seq_len``
    windows (EOS-separated, positions restarting per document); without it every document is one example,
    truncated to ``seq_len`` and padded per batch. Default: packed text, padded chat.

    ``kind: shards`` streams tokenised shard directories written by ``myllm data tokenize`` (any size; always
    packed text): ``path`` is one directory, a list, or a mapping ``{directory: weight}`` for a mixture (e.g.
    ``{web: 0.7, code: 0.3}``); ``num_workers`` DataLoader processes build windows ahead. The shards' tokenizer
    fingerprint must match the model's tokenizer.
    """

    kind: Literal["jsonl", "shards"] = "jsonl"
    path: str | list[str] | dict[str, float]
    format: Literal["text", "chat"] | None = None
    text_field: str = "text"
    messages_field: str = "conversations"
    chat_template: str | None = Field(None, description="Jinja template; default: the tokenizer's, else ChatML")
    seq_len: int = Field(512, ge=2)
    packing: bool | None = None
    shuffle: bool = True
    num_workers: int = Field(0, ge=0, description="shards: DataLoader worker processes")

    @model_validator(mode="after")
    def _kind_options(self) -> DataSpec:
        if self.kind == "jsonl" and isinstance(self.path, dict):
            raise ValueError("a {path: weight} mixture needs data.kind: shards")
        if self.kind == "shards" and (self.format == "chat" or self.packing is False):
            raise ValueError("data.kind: shards holds packed text; use kind: jsonl for chat or padded data")
        if self.kind == "jsonl" and self.num_workers:
            raise ValueError("data.num_workers is only used by data.kind: shards")
        return self

    def paths(self) -> list[str]:
        if isinstance(self.path, str):
            return [self.path]
        return list(self.path)


class PretrainObjective(_Section):
    """Causal LM on every target token."""

    kind: Literal["pretrain"] = "pretrain"


class SFTObjective(_Section):
    """Causal LM on assistant tokens only (the chat data marks them)."""

    kind: Literal["sft"] = "sft"


class LayerPair(_Section):
    """A (student layer, teacher layer) pair for intermediate-layer distillation; indices of decoder layers."""

    student: int = Field(ge=0)
    teacher: int = Field(ge=0)
    weight: float = Field(1.0, ge=0)


class DistillObjective(_Section):
    """Knowledge distillation from a teacher with the same tokenizer.

    loss = ``ce_weight`` * CE + (1 - ``ce_weight``) * T^2 * D(teacher, student) + hidden and attention terms,
    where D is ``forward_kl`` = KL(p_T || p_S), ``reverse_kl`` = KL(p_S || p_T) or ``jsd`` (generalised JSD with
    mixture m = beta * p_T + (1 - beta) * p_S: beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)), on the
    temperature-softened distributions of every target token. ``hidden_layers``: MSE between a learned linear
    projection of the student's layer output and the teacher's; ``attention_layers``: KL between attention maps.
    """

    kind: Literal["distill"] = "distill"
    teacher: ModelSpec
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, gt=0, lt=1, description="jsd mixture weight of the teacher")
    temperature: float = Field(1.0, gt=0)
    ce_weight: float = Field(0.5, ge=0, le=1)
    hidden_layers: list[LayerPair] = []
    hidden_weight: float = Field(1.0, ge=0)
    attention_layers: list[LayerPair] = []
    attention_weight: float = Field(1.0, ge=0)


Objective = Annotated[PretrainObjective | SFTObjective | DistillObjective, Field(discriminator="kind")]


class OptimizerSpec(_Section):
    """AdamW (decoupled weight decay; biases, norms and other 1-D parameters are not decayed)."""

    kind: Literal["adamw"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)


class ScheduleSpec(_Section):
    """Learning-rate schedule from transformers.

    ``cosine``: linear warmup then cosine to ``min_lr_ratio`` * lr (``get_cosine_with_min_lr_schedule_with_warmup``);
    ``wsd``: warmup, constant, then ``decay_steps`` of ``decay_type`` decay to ``min_lr_ratio`` (``get_wsd_schedule``;
    default decay: the last 10% of steps); ``constant``: warmup then constant.
    """

    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    decay_steps: int | None = Field(None, ge=0)
    decay_type: Literal["cosine", "linear", "1-sqrt"] = "linear"


class EngineSpec(_Section):
    """``torch`` (one process, CPU or one GPU) or ``deepspeed`` (ZeRO 0-3, launched by deepspeed or torchrun).

    ``deepspeed_config``: a DeepSpeed JSON (path or dict) whose settings are kept; the run config fills what it
    leaves out or sets to ``"auto"``; a conflicting value is an error. ``precision``: ``auto`` is bf16 on a GPU
    that supports it, else fp32.
    """

    kind: Literal["torch", "deepspeed"] = "torch"
    zero_stage: Literal[0, 1, 2, 3] | None = None
    deepspeed_config: str | dict[str, Any] | None = None
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = Field("auto", description="torch engine: auto, cpu, cuda, cuda:1, ...")

    @model_validator(mode="after")
    def _engine_options(self) -> EngineSpec:
        if self.kind == "torch" and self.zero_stage not in (None, 0):
            raise ValueError(
                f"ZeRO-{self.zero_stage} needs the deepspeed engine (engine.kind: deepspeed); "
                "the torch engine trains in one process without partitioning"
            )
        if self.kind == "torch" and self.deepspeed_config is not None:
            raise ValueError("engine.deepspeed_config is only used by engine.kind: deepspeed")
        return self


class LoraSpec(_Section):
    """LoRA through PEFT: ``target_modules`` (names, suffixes, a regex string or ``all-linear``) and/or
    ``target_parameters`` (bare 2-D/3-D parameters such as fused experts, e.g. ``mlp.experts.gate_up_proj``).
    ``save``: write the adapter, the merged model, or both at the end."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None
    save: Literal["adapter", "merged", "both"] = "both"

    @model_validator(mode="after")
    def _some_target(self) -> LoraSpec:
        if not self.target_modules and not self.target_parameters:
            raise ValueError("LoRA needs `target_modules` and/or `target_parameters`")
        if self.target_parameters and self.dropout:
            raise ValueError("LoRA on `target_parameters` needs dropout 0 (a PEFT limitation)")
        return self


class TrainSpec(_Section):
    """Steps and batch: one optimizer step sees ``micro_batch_size * grad_accum * world_size`` windows."""

    max_steps: int = Field(ge=1)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; null disables clipping")
    seed: int = 0


class CheckpointSpec(_Section):
    """``every`` N steps (null: only when ``save_final``), keeping the newest ``keep_last``.
    ``resume``: ``auto`` (the newest checkpoint in ``output_dir/checkpoints`` if any), ``never``, or a path."""

    every: int | None = Field(None, ge=1)
    keep_last: int = Field(2, ge=1)
    resume: str = "auto"
    save_final: bool = True


class LoggingSpec(_Section):
    """Metrics every ``every`` steps, appended to ``output_dir/<metrics_file>`` (JSONL); a tqdm bar."""

    every: int = Field(1, ge=1)
    progress: bool = True
    metrics_file: str = "metrics.jsonl"


_DEFAULT_FORMAT = {"pretrain": "text", "sft": "chat", "distill": "text"}


class RunConfig(_Section):
    """Everything one training run needs; see the module docstring for an example."""

    output_dir: str
    model: ModelSpec
    data: DataSpec
    objective: Objective = PretrainObjective()
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    engine: EngineSpec = EngineSpec()
    lora: LoraSpec | None = None
    train: TrainSpec
    checkpoint: CheckpointSpec = CheckpointSpec()
    logging: LoggingSpec = LoggingSpec()

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        kind = self.objective.kind
        fmt = self.data.format or _DEFAULT_FORMAT[kind]
        if kind == "sft" and fmt != "chat":
            raise ValueError("objective sft trains on chat data: data.format must be `chat`")
        if kind == "sft" and self.data.kind == "shards":
            raise ValueError("objective sft needs chat data (data.kind: jsonl); shards hold packed text")
        if kind == "pretrain" and fmt != "text":
            raise ValueError("objective pretrain trains on text data: data.format must be `text` (use sft for chat)")
        if self.model.tokenizer_path() is None:
            raise ValueError("model.tokenizer is required when the model is given as an inline `config`")
        sched = self.schedule
        if sched.warmup_steps > self.train.max_steps:
            raise ValueError(
                f"schedule.warmup_steps ({sched.warmup_steps}) > train.max_steps ({self.train.max_steps})"
            )
        if sched.decay_steps is not None and sched.warmup_steps + sched.decay_steps > self.train.max_steps:
            raise ValueError("schedule.warmup_steps + schedule.decay_steps exceed train.max_steps")
        return self

    @property
    def data_format(self) -> str:
        return self.data.format or _DEFAULT_FORMAT[self.objective.kind]

    @property
    def packing(self) -> bool:
        return self.data.packing if self.data.packing is not None else self.data_format == "text"


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in _OBJECTIVE_TAGS))
        lines.append(f"  {loc or '(top level)'}: {err['msg']}")
    return "\n".join(lines)


_OBJECTIVE_TAGS = {"pretrain", "sft", "distill"}


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the path-valued fields of a raw config dict absolute against ``base`` (the config file's folder)."""

    def fix(section: dict[str, Any] | None, key: str) -> None:
        if not isinstance(section, dict) or section.get(key) is None:
            return
        value = section[key]
        if isinstance(value, dict):  # a {path: weight} mixture
            section[key] = {str(base / k): v for k, v in value.items()}
        elif isinstance(value, list):
            section[key] = [str(base / v) if isinstance(v, str) else v for v in value]
        elif isinstance(value, str):
            section[key] = str(base / value)

    raw = json.loads(json.dumps(raw))  # deep copy of plain data
    fix(raw, "output_dir")
    for section in (raw.get("model"), (raw.get("objective") or {}).get("teacher")):
        fix(section, "path")
        fix(section, "tokenizer")
    fix(raw.get("data"), "path")
    fix(raw.get("engine"), "deepspeed_config")
    ckpt = raw.get("checkpoint")
    if isinstance(ckpt, dict) and ckpt.get("resume") not in (None, "auto", "never"):
        fix(ckpt, "resume")
    return raw


def parse_config(raw: dict[str, Any], *, source: str = "config") -> RunConfig:
    """Validate a plain dict into a :class:`RunConfig`; errors are :class:`ConfigError` naming every field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid run configuration\n{_format_errors(exc)}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from a ``.yaml``/``.yml`` or ``.json`` file (relative paths: against its folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot parse: {exc}") from None
    if isinstance(raw, dict):
        raw = apply_overrides(raw, list(overrides or []))
        raw = _resolve_paths(raw, path.resolve().parent)
    return parse_config(raw, source=str(path))
