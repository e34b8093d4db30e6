"""Objectives: what one micro-batch's loss is. The loop is the same for all of them.

An objective turns a batch into a scalar whose sum over the micro-batches of one optimizer step is the step's
loss (see :class:`StepCounts`), plus detached metrics. ``pretrain`` and ``sft`` share :class:`CausalLM` (the
data decides which tokens are targets); ``distill`` adds a frozen teacher, logit KD and optional
intermediate-layer terms with learned projections (:meth:`Objective.extra_modules`, trained with the model).

MoE models: the model adds its auxiliary balancing loss to ``out.loss`` when it is given labels; the objective
counts it once per optimizer step (a mean over micro-batches) instead of once per micro-batch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

from myllm.train import losses
from myllm.train.config import DistillObjective

Batch = dict[str, torch.Tensor]
Metrics = dict[str, torch.Tensor]


@dataclass
class StepCounts:
    """Normalisers of one optimizer step, shared by all its micro-batches.

    ``items``: target tokens of the whole step (all micro-batches, all ranks) divided by the world size, so
    that each rank's sum-reduced loss, averaged over ranks by data parallelism, is the global per-token mean.
    ``tokens``: the same for real (non-padding) tokens, for per-token feature losses. ``micro_batches``: the
    number of micro-batches per step on one rank (gradient accumulation).
    """

    items: torch.Tensor
    tokens: torch.Tensor
    micro_batches: int


class Objective(Protocol):
    name: str

    def extra_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Trainable modules beside the model (e.g. KD projections); empty for plain objectives."""
        ...

    def loss(self, module: nn.Module, batch: Batch, counts: StepCounts) -> tuple[torch.Tensor, Metrics]:
        """``module`` is the :class:`~myllm.train.core.TrainModule` (``.model``, ``.extras``)."""
        ...

    def to(self, device: torch.device) -> None:
        """Move whatever the objective owns outside the trained module (a teacher) to ``device``."""
        ...


def _accepts_loss_kwargs(model: nn.Module) -> bool:
    if getattr(model, "accepts_loss_kwargs", None) is False:
        return False
    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}


def _aux_in_loss(model: nn.Module, out: Any) -> torch.Tensor | None:
    """The MoE balancing term the model added to ``out.loss`` (HF MoE models: coef * aux_loss)."""
    aux = getattr(out, "aux_loss", None)
    if aux is None or not torch.is_tensor(aux):
        return None
    coef = getattr(model.config, "router_aux_loss_coef", 1.0)
    return coef * aux


def lm_forward(
    model: nn.Module, batch: Batch, counts: StepCounts, **extra: Any
) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
    """Forward with labels; returns ``(outputs, ce, aux)``, both terms with gradients.

    ``ce``: the sum over target tokens divided by ``counts.items`` (transformers' ``num_items_in_batch``).
    ``aux``: an MoE model's balancing term divided by the number of micro-batches (so each optimizer step counts
    it once), or ``None`` for dense models.
    """
    if getattr(model.config, "output_router_logits", None) is not None:
        extra.setdefault("output_router_logits", True)  # HF MoE models add their aux loss only when asked
    inputs = _model_inputs(batch)
    if _accepts_loss_kwargs(model):
        out = model(**inputs, labels=batch["labels"], num_items_in_batch=counts.items, use_cache=False, **extra)
        total = out.loss
    else:
        out = model(**inputs, use_cache=False, **extra)
        total = ForCausalLMLoss(out.logits, batch["labels"], out.logits.shape[-1], num_items_in_batch=counts.items)
    aux = _aux_in_loss(model, out)
    if aux is None:
        return out, total, None
    return out, total - aux, aux / counts.micro_batches


def _lm_metrics(ce: torch.Tensor, aux: torch.Tensor | None) -> Metrics:
    metrics = {"ce": ce.detach()}
    if aux is not None:
        metrics["aux"] = aux.detach()
    return metrics


class CausalLM:
    """Next-token cross-entropy on the targets the data marks (all tokens for pretraining, assistant for SFT)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def extra_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {}

    def loss(self, module: nn.Module, batch: Batch, counts: StepCounts) -> tuple[torch.Tensor, Metrics]:
        _, ce, aux = lm_forward(module.model, batch, counts)
        return (ce if aux is None else ce + aux), _lm_metrics(ce, aux)

    def to(self, device: torch.device) -> None:
        return None


def _layer_count(model: nn.Module) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


def _hidden_size(model: nn.Module) -> int:
    return int(model.config.get_text_config().hidden_size)


class Distill:
    """Response-based and intermediate-layer knowledge distillation (see ``DistillObjective``)."""

    name = "distill"

    def __init__(self, spec: DistillObjective, teacher: nn.Module) -> None:
        self.spec = spec
        self.teacher = teacher.eval().requires_grad_(False)

    def validate(self, student: nn.Module) -> None:
        """Layer pairs must exist in both models (raises ``ValueError`` before training)."""
        ls, lt = _layer_count(student), _layer_count(self.teacher)
        for kind, pairs in (
            ("hidden_layers", self.spec.hidden_layers),
            ("attention_layers", self.spec.attention_layers),
        ):
            for p in pairs:
                if p.student >= ls or p.teacher >= lt:
                    raise ValueError(
                        f"objective.{kind}: pair (student {p.student}, teacher {p.teacher}) is out of range; the "
                        f"student has {ls} layers, the teacher {lt}"
                    )

    def extra_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """One bias-free linear map student -> teacher hidden size per hidden pair (only if the sizes differ)."""
        ds, dt = _hidden_size(model), _hidden_size(self.teacher)
        if ds == dt:
            return {}
        mods = {}
        for i, _ in enumerate(self.spec.hidden_layers):
            proj = nn.Linear(ds, dt, bias=False)
            nn.init.xavier_uniform_(proj.weight)
            mods[f"hidden_proj_{i}"] = proj.to(next(model.parameters()).dtype)
        return mods

    def to(self, device: torch.device) -> None:
        self.teacher.to(device)

    def loss(self, module: nn.Module, batch: Batch, counts: StepCounts) -> tuple[torch.Tensor, Metrics]:
        spec = self.spec
        want_hidden, want_attn = bool(spec.hidden_layers), bool(spec.attention_layers)
        feats = {"output_hidden_states": want_hidden, "output_attentions": want_attn}
        out, ce, aux = lm_forward(module.model, batch, counts, **feats)
        with torch.no_grad():
            t_out = self.teacher(**_model_inputs(batch), use_cache=False, **feats)
        kd = (
            losses.kd_loss_sum(
                out.logits, t_out.logits, batch["labels"], kind=spec.loss, temperature=spec.temperature, beta=spec.beta
            )
            / counts.items
        )
        total = spec.ce_weight * ce + (1.0 - spec.ce_weight) * kd + (0.0 if aux is None else aux)
        metrics = _lm_metrics(ce, aux)
        metrics["kd"] = kd.detach()
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).float()
        if want_hidden:
            hidden = 0.0
            for i, p in enumerate(spec.hidden_layers):
                h_s = out.hidden_states[p.student + 1]  # [B, T, Ds]; index 0 is the embedding output
                proj = module.extras[f"hidden_proj_{i}"] if f"hidden_proj_{i}" in module.extras else nn.Identity()
                h = losses.hidden_mse_sum(proj(h_s), t_out.hidden_states[p.teacher + 1], mask)
                hidden = hidden + p.weight * h / counts.tokens
            total = total + spec.hidden_weight * hidden
            metrics["hidden"] = hidden.detach()
        if want_attn:
            attn = 0.0
            for p in spec.attention_layers:
                a = losses.attention_kl_sum(out.attentions[p.student], t_out.attentions[p.teacher], mask)
                attn = attn + p.weight * a / counts.tokens
            total = total + spec.attention_weight * attn
            metrics["attn"] = attn.detach()
        return total, metrics
