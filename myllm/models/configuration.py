"""``MyLLMConfig``: the configuration of the MyLLM causal LM, one registry block per slot and layer.

The model has three block slots per decoder layer, each named by a *block spec*: a JSON-serialisable dict
``{"name": <registry name>, **kwargs}`` (a bare string ``"sdpa"`` is shorthand for ``{"name": "sdpa"}``)::

    MyLLMConfig(
        attention={"name": "sdpa", "qkv_bias": True},         # every layer's self-attention
        ffn={"name": "moe", "n_experts": 8, "top_k": 2},      # every layer's feed-forward block
        norm="rmsnorm",                                       # both norms of every layer, and the final norm
        layer_overrides={"0": {"ffn": {"name": "dense"}}},    # layer 0 keeps a dense FFN (DeepSeek style)
        kv_cache="dynamic",                                   # the cache block generate()/forward build
    )

Sizes are not repeated in the specs: :meth:`MyLLMConfig.resolve_block` fills every keyword that the block's
pydantic config declares and the model config knows (``hidden_size``, ``num_heads``, ``num_kv_heads``,
``head_dim``, ``intermediate_size``, ``act``, ``eps``, ``num_layers``, ``layer_idx``, ``rope_parameters`` ...;
see :data:`DERIVED_KWARGS`); keywords given in the spec win. A layer override *replaces* the slot's spec for
that layer (it is not merged), so ``{"name": "dense"}`` does not inherit the MoE keywords.

Attention implementation: transformers' ``attn_implementation`` is a view of the attention specs. Reading
``config._attn_implementation`` gives the mask format the layers want (``"eager"`` when every layer's block is
eager, else ``"sdpa"``). Setting it (``from_pretrained(..., attn_implementation="eager")``,
``MyLLMConfig(attn_implementation=...)``, ``model.set_attn_implementation(...)``) switches every layer whose
block is a *kernel variant* of the requested block (registered with the same pydantic config class, hence the
same weights) to that block, and leaves structurally different blocks (MoBA, MLA) alone.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

from transformers import PreTrainedConfig

from myllm.blocks import registry

SLOTS: tuple[str, ...] = ("attention", "ffn", "norm")
"""The per-layer block slots; each is also the registry kind of its blocks."""

LAYER_TYPES: tuple[str, str] = ("full_attention", "sliding_attention")
"""``layer_types`` values (transformers' names), indexed by "is sliding"."""

DEFAULT_SPECS: dict[str, dict[str, Any]] = {
    "attention": {"name": "sdpa"},
    "ffn": {"name": "dense"},
    "norm": {"name": "rmsnorm"},
    "kv_cache": {"name": "dynamic"},
}


def _attention_kwargs(c: MyLLMConfig) -> dict[str, Any]:
    return {
        "hidden_size": c.hidden_size,
        "num_heads": c.num_attention_heads,
        "num_kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "norm_eps": c.rms_norm_eps,
        "dropout": c.attention_dropout,
        "rope_parameters": copy.deepcopy(c.rope_parameters),
        "max_position_embeddings": c.max_position_embeddings,
    }


def _ffn_kwargs(c: MyLLMConfig) -> dict[str, Any]:
    return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "act": c.hidden_act}


def _norm_kwargs(c: MyLLMConfig) -> dict[str, Any]:
    return {"hidden_size": c.hidden_size, "eps": c.rms_norm_eps, "num_layers": c.num_hidden_layers}


DERIVED_KWARGS: dict[str, Callable[[MyLLMConfig], dict[str, Any]]] = {
    "attention": _attention_kwargs,
    "ffn": _ffn_kwargs,
    "norm": _norm_kwargs,
}
"""Per slot: the keywords the model config supplies to a block (only those the block's config declares);
``layer_idx`` is added for per-layer blocks."""


def normalise_spec(spec: Any, *, where: str) -> dict[str, Any]:
    """``"sdpa"`` or ``{"name": "sdpa", **kwargs}`` -> a fresh ``{"name": ..., **kwargs}`` dict.

    Raises:
        ValueError: not a string or a dict with a string ``name``, or keywords that are not JSON-serialisable.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"{where}: a block spec is a name or a dict with a 'name' key, got {spec!r}")
    try:
        json.dumps(spec)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: block spec {spec!r} is not JSON-serialisable ({exc})") from None
    spec = copy.deepcopy(spec)
    spec["name"] = spec["name"].strip().lower().replace("-", "_")
    return spec


class MyLLMConfig(PreTrainedConfig):
    r"""Configuration of :class:`~myllm.MyLLMForCausalLM` (model_type ``"myllm"``).

    Args:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
        head_dim, hidden_act, max_position_embeddings, rope_parameters, attention_dropout, initializer_range,
        tie_word_embeddings, use_cache, pad/bos/eos_token_id: as in ``LlamaConfig``.
        rms_norm_eps: epsilon of every norm block (the name is kept from Llama; also used by LayerNorm/DeepNorm).
        attention, ffn, norm: block spec of each slot for every layer (see the module docstring).
        layer_overrides: ``{"<layer index>": {"<slot>": spec}}`` replacing a slot's spec in one layer.
        kv_cache: spec of the cache block ``forward(use_cache=True)`` and ``generate()`` build by default.
        sliding_window: window of the layers whose ``layer_types`` entry is ``"sliding_attention"`` (each query
            sees itself and the ``sliding_window - 1`` tokens before it, as in Mistral and Qwen2).
        layer_types: per layer ``"full_attention"`` or ``"sliding_attention"`` (transformers' convention, which
            its masks and caches read); default: every layer sliding when ``sliding_window`` is set, else full.
        output_router_logits: return MoE ``router_logits`` and ``aux_loss`` by default.
        myllm_surgeries: structural changes the block specs cannot express, replayed after the layers are built
            (``myllm.surgery.add_experts`` entries; see :mod:`myllm.factory.recipe`). Written by the surgeries.
        source_model_type: the Hugging Face ``model_type`` the weights were imported from (``from_hf``); the
            default target of ``to_hf``.
    """

    model_type = "myllm"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rope_parameters: dict | None = None
    rms_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    attention: dict | str | None = None
    ffn: dict | str | None = None
    norm: dict | str | None = None
    kv_cache: dict | str | None = None
    layer_overrides: dict | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    output_router_logits: bool = False
    myllm_surgeries: list | None = None
    source_model_type: str | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for slot, default in DEFAULT_SPECS.items():
            value = getattr(self, slot)
            setattr(self, slot, normalise_spec(value if value is not None else default, where=f"MyLLMConfig.{slot}"))
        self.layer_overrides = self._normalise_overrides(self.layer_overrides)
        self.layer_types = self._normalise_layer_types()
        # transformers' own post-init: RoPE standardisation, and `attn_implementation` through our setter below
        super().__post_init__(**kwargs)
        self.validate_blocks()

    # ----------------------------------------------------------------------------------------------- specs
    def _normalise_overrides(self, overrides: dict | None) -> dict[str, dict[str, dict[str, Any]]]:
        if overrides is None:
            return {}
        if not isinstance(overrides, dict):
            raise ValueError(f"layer_overrides must be a dict {{layer index: {{slot: spec}}}}, got {overrides!r}")
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for key, slots in overrides.items():
            try:
                idx = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"layer_overrides: layer key {key!r} is not an integer") from None
            if not 0 <= idx < self.num_hidden_layers:
                raise ValueError(
                    f"layer_overrides: layer {idx} is out of range for num_hidden_layers={self.num_hidden_layers}"
                )
            if not isinstance(slots, dict):
                raise ValueError(f"layer_overrides[{key!r}] must be a dict {{slot: spec}}, got {slots!r}")
            unknown = sorted(set(slots) - set(SLOTS))
            if unknown:
                raise ValueError(
                    f"layer_overrides[{key!r}]: unknown slot(s) {unknown}; valid slots: {', '.join(SLOTS)}"
                )
            where = f"layer_overrides[{key!r}]"
            out[str(idx)] = {slot: normalise_spec(spec, where=f"{where}[{slot!r}]") for slot, spec in slots.items()}
        return out

    def _normalise_layer_types(self) -> list[str]:
        window, types = self.sliding_window, self.layer_types
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"sliding_window must be a positive integer or None, got {window!r}")
        if types is None:
            return [LAYER_TYPES[window is not None]] * self.num_hidden_layers
        types = list(types)
        if len(types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(types)} entries for num_hidden_layers={self.num_hidden_layers}")
        unknown = sorted(set(types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"layer_types: unknown type(s) {unknown}; valid: {', '.join(LAYER_TYPES)}")
        if window is None and LAYER_TYPES[True] in types:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        return types

    @property
    def has_sliding_layers(self) -> bool:
        """Whether any layer attends through a sliding window."""
        return LAYER_TYPES[True] in self.layer_types

    def block_spec(self, slot: str, layer_idx: int | None = None) -> dict[str, Any]:
        """The spec (``{"name", **kwargs}``) of ``slot`` in layer ``layer_idx`` (``None``: the model-level one)."""
        if slot not in DEFAULT_SPECS:
            raise ValueError(f"unknown slot {slot!r}; valid slots: {', '.join(DEFAULT_SPECS)}")
        if layer_idx is not None:
            override = self.layer_overrides.get(str(layer_idx), {})
            if slot in override:
                return override[slot]
        return getattr(self, slot)

    def resolve_block(self, slot: str, layer_idx: int | None = None) -> tuple[str, dict[str, Any]]:
        """``(name, kwargs)`` to build ``slot`` of layer ``layer_idx``: the spec's keywords over the derived sizes."""
        spec = self.block_spec(slot, layer_idx)
        name = spec["name"]
        fields = registry.get(slot, name).config.model_fields
        derived = DERIVED_KWARGS[slot](self)
        if layer_idx is not None:
            derived["layer_idx"] = layer_idx
        kwargs = {k: v for k, v in derived.items() if k in fields}
        kwargs.update({k: copy.deepcopy(v) for k, v in spec.items() if k != "name"})
        return name, kwargs

    def build_block(self, slot: str, layer_idx: int | None = None) -> Any:
        """Build the block of ``slot`` for layer ``layer_idx`` through the registry."""
        name, kwargs = self.resolve_block(slot, layer_idx)
        return registry.build(slot, name, **kwargs)

    def build_cache(self, **overrides: Any) -> Any:
        """Build the ``kv_cache`` block (``overrides`` win over the spec's keywords, e.g. ``max_cache_len``)."""
        spec = self.kv_cache
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        kwargs.update(overrides)
        return registry.build("cache", spec["name"], config=self, **kwargs)

    def validate_blocks(self) -> None:
        """Validate every layer's resolved block keywords and the model-level blocks before anything is built.

        Raises:
            ValueError: naming the layer, the slot and the block (pydantic's message, which names the field, or
                the registry's, which lists the valid names); ``pydantic.ValidationError`` is a ``ValueError``.
        """
        for layer_idx in [*range(self.num_hidden_layers), None]:
            where = "model level" if layer_idx is None else f"layer {layer_idx}"
            for slot in SLOTS if layer_idx is not None else ("norm",):
                spec = self.block_spec(slot, layer_idx)
                try:
                    name, kwargs = self.resolve_block(slot, layer_idx)
                    registry.validate(slot, name, **kwargs)
                except (KeyError, ValueError) as exc:
                    raise ValueError(f"MyLLMConfig: {where} {slot} block {spec['name']!r}: {exc}") from exc
                if slot == "norm":
                    placement = getattr(registry.get("norm", name).builder, "placement", None)
                    if placement not in ("pre", "post"):
                        raise ValueError(
                            f"MyLLMConfig: norm block {name!r} has no `placement` capability ('pre' or 'post')"
                        )
        for layer_idx, kind in enumerate(self.layer_types):
            name = self.block_spec("attention", layer_idx)["name"]
            if kind == LAYER_TYPES[True] and not getattr(
                registry.get("attention", name).builder, "takes_sliding_window_mask", True
            ):
                raise ValueError(
                    f"MyLLMConfig: layer {layer_idx} is a sliding_attention layer, but attention block {name!r} does "
                    "not take a sliding-window mask; use full_attention for it in layer_types"
                )
        if self.kv_cache["name"] not in registry.available("cache"):
            raise ValueError(
                f"MyLLMConfig: unknown kv_cache block {self.kv_cache['name']!r}; "
                f"available cache blocks: {', '.join(registry.available('cache'))}"
            )

    # ----------------------------------------------------------------------------- attention implementation
    def _layer_attention_names(self) -> list[str]:
        return [self.block_spec("attention", i)["name"] for i in range(self.num_hidden_layers)]

    def kernel_variants(self) -> list[str]:
        """Attention blocks any layer can switch to without touching weights (same config class as its block)."""
        configs = {registry.get("attention", n).config for n in self._layer_attention_names()}
        return [s.name for s in registry.specs("attention") if s.config in configs]

    def switched_attention(self, name: str) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, Any]]]]:
        """``(attention, layer_overrides)`` with every kernel variant of block ``name`` switched to ``name``.

        Pure: the config is not changed. Raises ``ValueError`` listing the valid names when no layer's block is a
        kernel variant of ``name`` (or ``name`` is not a registered attention block).
        """
        valid = self.kernel_variants()
        key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
        if key not in valid:
            raise ValueError(
                f"attn_implementation {name!r} is not an attention block this model's layers can switch to; "
                f"valid: {', '.join(valid)}"
            )
        target = registry.get("attention", key)

        def switch(spec: dict[str, Any]) -> dict[str, Any]:
            same_weights = registry.get("attention", spec["name"]).config is target.config
            return {**copy.deepcopy(spec), "name": key} if same_weights else copy.deepcopy(spec)

        overrides = {
            idx: {slot: switch(spec) if slot == "attention" else copy.deepcopy(spec) for slot, spec in slots.items()}
            for idx, slots in self.layer_overrides.items()
        }
        return switch(self.attention), overrides

    @property
    def _attn_implementation(self) -> str:
        """transformers' view: the mask format the attention blocks want (``"eager"`` iff all want it)."""
        if not isinstance(self.__dict__.get("attention"), dict) or "layer_overrides" not in self.__dict__:
            return self.__dict__.get("_attn_implementation_internal") or "sdpa"  # mid-construction
        # O(overrides), not O(layers): this is read on every forward (mask creation)
        overridden = [s["attention"]["name"] for s in self.layer_overrides.values() if "attention" in s]
        names = set(overridden)
        if len(overridden) < self.num_hidden_layers:
            names.add(self.attention["name"])
        wanted = {getattr(registry.get("attention", n).builder, "mask_implementation", "sdpa") for n in names}
        return wanted.pop() if len(wanted) == 1 else "sdpa"

    @_attn_implementation.setter
    def _attn_implementation(self, value: str | dict | None) -> None:
        if isinstance(value, dict):
            value = value.get("")
        if value is None:
            return
        self.attention, self.layer_overrides = self.switched_attention(value)


__all__ = ["DEFAULT_SPECS", "DERIVED_KWARGS", "MyLLMConfig", "SLOTS", "normalise_spec"]
