"""Weight movers for attention targets: trained GQA/MHA attention -> the ``mla`` block.

``myllm.factory.replace(model, "attention", "mla", kv_lora_rank=64, rope_dims=8)`` converts every chosen
layer with :func:`myllm.surgery.mla.gqa_to_mla` (joint K/V SVD, 2-norm partial RoPE, q/k biases and norms
kept). Surgery options: ``rope_dims`` (RoPE dims kept per kv head; default: all, i.e. exact up to the rank),
``calibration`` (inputs of the attention layers, ``{layer index: [N, hidden]}`` or a list indexed by layer,
e.g. from :func:`myllm.surgery.mla.collect_attention_inputs`) and ``balance_kv``. The block's layout
(``rope_pairs``, head counts, biases ...) comes from the weights, so :meth:`GQAToMLAMover.check` completes the
block keywords and the recipe records them per layer; a reload rebuilds exactly the same blocks.

MoBA needs no mover of its own: it has the very parameters of GQA attention (the generic same-state mover
shares them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from myllm.blocks.attention.mla import MLAttention
from myllm.blocks.registry import BlockSpec
from myllm.factory.movers import MoveError, Mover, register_mover
from myllm.surgery.attention import read_attention
from myllm.surgery.mla import MLAConversion, gqa_to_mla

# block keywords the conversion decides; a caller's different value is an error, not silently replaced
_LAYOUT = (
    "num_kv_heads",
    "num_rope_heads",
    "q_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "rope_interleave",
    "rope_pairs",
    "rope_table_dim",
    "latent_norm",
    "attention_bias",
    "q_bias",
    "qk_norm",
)


def _calibration(options: dict[str, Any], layer_idx: int) -> torch.Tensor | None:
    data = options.get("calibration")
    if data is None or isinstance(data, torch.Tensor):
        return data
    try:
        return data[layer_idx]
    except (KeyError, IndexError, TypeError):
        raise MoveError(
            f"calibration must be a tensor, a dict {{layer index: tensor}} or a list indexed by layer; "
            f"found nothing for layer {layer_idx}"
        ) from None


class GQAToMLAMover(Mover):
    """q/k/v/o attention (HF Llama/Mistral/Qwen2/Qwen3 or myllm GQA blocks) -> ``mla``, by factorisation."""

    name = "gqa-to-mla"
    kinds = ("attention",)
    options = frozenset({"rope_dims", "calibration", "balance_kv"})

    def accepts(self, kind, old, spec, kwargs):
        if not (isinstance(spec.builder, type) and issubclass(spec.builder, MLAttention)):
            return f"{spec.kind}/{spec.name} is not a latent-attention block"
        try:
            read_attention(old)
        except (TypeError, ValueError) as exc:
            return str(exc)
        return None

    def _convert(self, old: nn.Module, kv_lora_rank: Any, layer_idx: int, options: dict[str, Any]) -> MLAConversion:
        spec = read_attention(old)
        if kv_lora_rank is None:
            raise MoveError("converting attention to mla needs kv_lora_rank= (the latent width)")
        state = {k: t.detach().cpu() for k, t in old.state_dict().items()}
        try:
            return gqa_to_mla(
                state,
                spec,
                kv_lora_rank=kv_lora_rank,
                rope_dims=options.get("rope_dims", spec.head_dim),
                calibration=_calibration(options, layer_idx),
                balance_kv=options.get("balance_kv", True),
            )
        except ValueError as exc:
            raise MoveError(f"cannot convert {type(old).__name__} (layer {layer_idx}) to mla: {exc}") from exc

    def check(self, old, spec: BlockSpec, kwargs, options):
        conversion = self._convert(old, kwargs.get("kv_lora_rank"), kwargs.get("layer_idx", 0), options)
        for key in _LAYOUT:
            if key in kwargs and kwargs[key] != conversion.block_kwargs.get(key):
                raise MoveError(
                    f"{key}={kwargs[key]!r} does not fit the converted weights, which give "
                    f"{key}={conversion.block_kwargs.get(key)!r} (set rope_dims= and kv_lora_rank= instead)"
                )
        return {**kwargs, **conversion.block_kwargs}  # the layout comes from the weights; e.g. absorb= stays

    def fill(self, old, new, options):
        conversion = self._convert(old, new.kv_lora_rank, new.layer_idx, options)
        if conversion.rope_pairs != new.block_kwargs["rope_pairs"]:
            raise MoveError("the RoPE pair selection changed between planning and filling")
        param = next(new.parameters())
        state = {k: t.to(device=param.device, dtype=param.dtype) for k, t in conversion.state_dict.items()}
        new.load_state_dict(state, strict=True)


register_mover(GQAToMLAMover())
