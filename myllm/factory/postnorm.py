"""Post-norm residuals for Hugging Face decoder layers (what a ``deepnorm`` norm needs).

HF decoder layers are pre-norm: ``x + attn(norm1(x))``. Norm blocks carry a ``placement`` capability
(``"pre"`` / ``"post"``) and ``residual_alpha``; a layer whose norms are post-norm must compute
DeepNet's ``x = norm1(alpha * x + attn(x)); x = norm2(alpha * x + ffn(x))`` instead.

The factory does that by instance-level module replacement: the decoder layer is replaced by a *new*
object of a generated subclass of its own class (``PostNormLlamaDecoderLayer(LlamaDecoderLayer)``) that
shares every child module, so state-dict keys, output-capture hooks (``isinstance`` checks) and gradient
checkpointing keep working; only ``forward`` differs. The base class is never modified, and replacing the
norms by pre-norm blocks again switches the layer back to an object of the base class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_CLASSES: dict[tuple[type, tuple[str, str, str, str]], type] = {}


def placement(module: nn.Module) -> str:
    """``"pre"`` or ``"post"``: a norm's residual placement (HF norms are pre-norm)."""
    return getattr(module, "placement", "pre")


def is_post_norm_layer(layer: nn.Module) -> bool:
    return getattr(type(layer), "_myllm_post_norm_slots", None) is not None


def base_layer_class(layer: nn.Module) -> type:
    return getattr(type(layer), "_myllm_base_layer_class", type(layer))


def _post_norm_forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``hidden_states [B, T, H] -> [B, T, H]`` with post-norm residuals scaled by each norm's ``residual_alpha``.

    The attention slot receives exactly the keyword arguments the host model passed to the layer, as in
    the HF pre-norm layer.
    """
    attn_name, ffn_name, norm1_name, norm2_name = self._myllm_post_norm_slots
    norm1, norm2 = getattr(self, norm1_name), getattr(self, norm2_name)
    attn_out = getattr(self, attn_name)(hidden_states=hidden_states, **kwargs)
    attn_out = attn_out[0] if isinstance(attn_out, tuple) else attn_out
    hidden_states = norm1(norm1.residual_alpha * hidden_states + attn_out)
    hidden_states = norm2(norm2.residual_alpha * hidden_states + getattr(self, ffn_name)(hidden_states))
    return hidden_states


def post_norm_class(base: type, slots: tuple[str, str, str, str]) -> type:
    """The generated post-norm subclass of decoder-layer class ``base`` (cached)."""
    key = (base, slots)
    if key not in _CLASSES:
        _CLASSES[key] = type(
            f"PostNorm{base.__name__}",
            (base,),
            {
                "forward": _post_norm_forward,
                "_myllm_post_norm_slots": slots,
                "_myllm_base_layer_class": base,
                "__module__": __name__,
                "__doc__": f"{base.__name__} with DeepNet post-norm residuals (see myllm.factory.postnorm).",
            },
        )
    return _CLASSES[key]


def reclass(module: nn.Module, cls: type) -> nn.Module:
    """A new module object of class ``cls`` sharing ``module``'s children, parameters and hooks.

    ``module`` itself is left untouched (its registries are copied, not shared), so putting it back
    restores the previous state exactly.
    """
    new = cls.__new__(cls)
    state = {k: (type(v)(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    new.__dict__.update(state)
    return new
