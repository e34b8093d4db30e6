"""Converting trained attention to MoBA: a kernel swap that keeps every weight.

MoBA has no parameters of its own (its gate is the mean key of each block), so the MoBA block holds exactly
the original ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (and Qwen3 ``q_norm``/``k_norm``).
:func:`moba_state_dict` is the (identity) weight transform, :func:`to_moba` the module conversion. The result
equals the original wherever ``top_k * chunk_size`` covers the sequence; elsewhere it is sparse and the model
needs continued training (the MoBA paper activates it over tens of billions of tokens and keeps the last
layers on full attention).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from myllm.blocks.attention.moba import MobaAttention, MobaConfig
from myllm.surgery.attention import read_attention

_REQUIRED = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")


def moba_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The MoBA block's state dict for an attention state dict: the same tensors (a shallow copy).

    Raises:
        KeyError: a q/k/v/o projection weight is missing.
    """
    missing = [k for k in _REQUIRED if k not in state_dict]
    if missing:
        raise KeyError(f"not an attention state dict with q/k/v/o projections: missing {missing}")
    return dict(state_dict)


def to_moba(module: nn.Module, *, chunk_size: int, top_k: int, kernel: str = "sparse") -> MobaAttention:
    """A :class:`MobaAttention` with ``module``'s weights, on its device and dtype; ``module`` is not changed.

    Raises:
        TypeError: ``module`` is not an attention the converter understands (see ``read_attention``).
        pydantic.ValidationError: bad MoBA settings (``chunk_size < 1``, ``top_k < 1``, sliding window, ...).
    """
    kwargs = read_attention(module).block_kwargs()
    config = MobaConfig(chunk_size=chunk_size, top_k=top_k, kernel=kernel, **kwargs)  # validate first
    param = next(module.parameters())
    block = MobaAttention(**dict(config)).to(device=param.device, dtype=param.dtype)
    block.load_state_dict(moba_state_dict(module.state_dict()), strict=True)
    return block.train(module.training)
