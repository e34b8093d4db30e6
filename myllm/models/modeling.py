"""The MyLLM causal LM: a transformers v5 ``PreTrainedModel`` assembled from registry blocks.

Every decoder layer holds ``self_attn``, ``mlp``, ``input_layernorm`` and ``post_attention_layernorm`` (the
parameter names of Llama/Qwen, so their weights load unchanged), each built from the config's block spec for
that layer (:meth:`MyLLMConfig.build_block`). The layer reads its norm's capability attributes instead of its
name: ``placement == "pre"`` gives ``x + f(norm(x))``, ``"post"`` gives ``norm(alpha * x + f(x))`` with
``alpha = norm.residual_alpha`` (DeepNorm), and a norm with ``init_beta`` gets DeepNet's scaled initialisation.

Legend: B batch, T new tokens, Tk keys (cache + new), H hidden size, V vocabulary, E experts.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs, install_output_capuring_hook

from myllm.blocks import registry
from myllm.blocks.attention.base import Attention, rope_config, rope_signature
from myllm.blocks.ffn.moe.router import init_router_state
from myllm.blocks.norm import deepnorm_init_
from myllm.models.configuration import MyLLMConfig


def pre_norm_residual(x: torch.Tensor, norm: nn.Module, sublayer: Any, alpha: float) -> torch.Tensor:
    """Pre-norm sub-layer (Llama/Qwen): ``x + f(norm(x))``."""
    return x + sublayer(norm(x))


def post_norm_residual(x: torch.Tensor, norm: nn.Module, sublayer: Any, alpha: float) -> torch.Tensor:
    """Post-norm sub-layer (DeepNet): ``norm(alpha * x + f(x))``; ``alpha`` scales the skip branch."""
    return norm(alpha * x + sublayer(x))


RESIDUALS = {"pre": pre_norm_residual, "post": post_norm_residual}
MASK_BUILDERS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
"""transformers' mask builder of each ``config.layer_types`` entry."""
"""Sub-layer wiring per norm ``placement`` capability."""


class MyLLMDecoderLayer(GradientCheckpointingLayer):
    """One decoder layer: attention and FFN sub-layers wired by the norm's ``placement``; ``[B, T, H] -> [B, T, H]``."""

    def __init__(self, config: MyLLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = config.build_block("attention", layer_idx)
        self.mlp = config.build_block("ffn", layer_idx)
        self.input_layernorm = config.build_block("norm", layer_idx)
        self.post_attention_layernorm = config.build_block("norm", layer_idx)
        self.residual_alpha = float(getattr(self.input_layernorm, "residual_alpha", 1.0))
        self.residual = RESIDUALS[self.input_layernorm.placement]
        self.deepnorm_initialised = False  # set by MyLLMPreTrainedModel.initialize_weights

    def deepnorm_weights(self) -> list[torch.Tensor]:
        """DeepNet's beta-scaled weights: the attention's value/output projections and every FFN matrix."""
        attn_weights = getattr(self.self_attn, "deepnorm_weights", None)
        if attn_weights is None:
            raise TypeError(f"{type(self.self_attn).__name__} does not define deepnorm_weights(), needed by DeepNorm")
        ffn_weights = getattr(self.mlp, "deepnorm_weights", None)
        ffn = ffn_weights() if ffn_weights is not None else [p for p in self.mlp.parameters() if p.dim() >= 2]
        return [*attn_weights(), *ffn]

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``hidden_states [B, T, H]`` -> ``[B, T, H]``; ``attention_mask`` as built by ``create_causal_mask``."""

        def attend(x: torch.Tensor) -> torch.Tensor:
            out, _ = self.self_attn(
                x,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
                use_cache=use_cache,
                **kwargs,
            )
            return out

        hidden_states = self.residual(hidden_states, self.input_layernorm, attend, self.residual_alpha)
        return self.residual(hidden_states, self.post_attention_layernorm, self.mlp, self.residual_alpha)


class MyLLMPreTrainedModel(PreTrainedModel):
    """Shared plumbing: config class, weight init (incl. DeepNorm), attention-implementation switching."""

    config_class = MyLLMConfig
    config: MyLLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MyLLMDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False
    _can_record_outputs = {"hidden_states": MyLLMDecoderLayer, "attentions": Attention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        init_router_state(module)
        if hasattr(module, "placement"):  # norm blocks, whatever their class name
            if getattr(module, "weight", None) is not None:
                init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)

    def initialize_weights(self) -> None:
        """transformers' initialisation, then DeepNet's beta-scaled init for layers whose norm has ``init_beta``.

        (A layer holds no parameters of its own, so transformers never calls ``_init_weights`` on it.) Loaded
        weights are flagged by transformers and left alone; each layer is initialised once.
        """
        super().initialize_weights()
        for layer in self.modules():
            beta = getattr(getattr(layer, "input_layernorm", None), "init_beta", None)
            if isinstance(layer, MyLLMDecoderLayer) and beta is not None and not layer.deepnorm_initialised:
                deepnorm_init_(layer.deepnorm_weights(), beta=beta)
                layer.deepnorm_initialised = True

    def set_attn_implementation(self, attn_implementation: str | dict, allow_all_kernels: bool = False) -> None:
        """Switch every layer whose attention block is a kernel variant of ``attn_implementation`` to that block.

        Kernel variants are attention blocks registered with the same pydantic config class (``eager`` and
        ``sdpa``): each new block is built (on the meta device) with the same keywords and takes over the old
        block's submodules, i.e. the very same parameters (optimizers, PEFT adapters and hooks on them keep
        working). The config's specs are updated, so ``save_pretrained`` records the change. Everything is built
        and checked before anything is swapped; on error the model is unchanged.

        Raises:
            ValueError: ``attn_implementation`` is not a kernel variant of any layer's attention block.
        """
        if isinstance(attn_implementation, dict):
            attn_implementation = attn_implementation.get("", self.config._attn_implementation)
        attention, overrides = self.config.switched_attention(attn_implementation)
        target = copy.deepcopy(self.config)
        target.attention, target.layer_overrides = attention, overrides
        new_blocks = {}
        for layer in (m for m in self.modules() if isinstance(m, MyLLMDecoderLayer)):
            name, kwargs = target.resolve_block("attention", layer.layer_idx)
            if type(layer.self_attn) is registry.get("attention", name).builder:
                continue
            with torch.device("meta"):
                block = registry.build("attention", name, **kwargs)
            _take_over_submodules(block, layer.self_attn)
            new_blocks[layer] = block
        for layer, block in new_blocks.items():
            layer.self_attn = block
            if getattr(self, "_output_capturing_hooks_installed", False):
                install_output_capuring_hook(block, "attentions", 1)
        self.config.attention, self.config.layer_overrides = attention, overrides


class MyLLMModel(MyLLMPreTrainedModel):
    """Embeddings, decoder layers and the final norm; ``input_ids [B, T] -> last_hidden_state [B, T, H]``."""

    def __init__(self, config: MyLLMConfig) -> None:
        super().__init__(config)
        # no padding_idx: a padding embedding with a frozen zero row is neither needed nor wanted
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MyLLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        final_norm = config.build_block("norm")
        # post-norm layers already end with a norm; pre-norm stacks need a final one
        self.norm = final_norm if final_norm.placement == "pre" else nn.Identity()
        rope = {
            "head_dim": config.head_dim or config.hidden_size // config.num_attention_heads,
            "rope_parameters": config.rope_parameters,
            "max_position_embeddings": config.max_position_embeddings,
        }
        self.rotary_emb = LlamaRotaryEmbedding(rope_config(**rope))
        self.rope_signature = rope_signature(**rope)
        self.gradient_checkpointing = False
        self.post_init()

    def shares_rope(self, attn: nn.Module) -> bool:
        """Whether ``attn`` uses the same RoPE as the model, so it can take the model's ``(cos, sin)``."""
        return getattr(attn, "rope_signature", None) == self.rope_signature

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """``input_ids [B, T]`` (or ``inputs_embeds [B, T, H]``) -> ``last_hidden_state [B, T, H]``.

        Args:
            attention_mask: ``[B, Tk]`` with 1 for real tokens (padding anywhere, e.g. left padding), a prepared
                4-D mask, or ``{layer type: 4-D mask}`` (see ``config.layer_types``).
            position_ids: ``[B, T]``; when missing they count the real tokens of a 2-D ``attention_mask``
                (so a left-padded row gets the positions of its unpadded sequence), else ``past + 0..T-1``.
                Positions restarting inside a row (packed documents), with no ``attention_mask`` and nothing
                cached yet, give a block-diagonal causal mask (transformers' ``create_causal_mask``).
            cache: a transformers ``Cache``; with ``use_cache`` and none given, the config's ``kv_cache`` block.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = self.config.build_cache()
        if position_ids is None:
            position_ids = self._default_position_ids(inputs_embeds, attention_mask, cache)

        # An empty growing cache sizes the mask exactly like no cache; passing none lets transformers detect
        # packed documents (restarting position_ids) even when forward was called with the default use_cache.
        empty_dynamic = cache is not None and not cache.is_compileable and cache.get_seq_length() == 0
        mask_kwargs = dict(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=None if empty_dynamic else cache,
            position_ids=position_ids,
        )
        if isinstance(attention_mask, dict):  # prepared per layer type (transformers' generate with a static cache)
            masks = attention_mask
        else:
            masks = {kind: MASK_BUILDERS[kind](**mask_kwargs) for kind in set(self.config.layer_types)}
        hidden_states = inputs_embeds
        shared = self.rotary_emb(hidden_states, position_ids)  # (cos, sin), each (B|1, T, D)
        for layer, kind in zip(self.layers, self.config.layer_types, strict=True):
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[kind],
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=shared if self.shares_rope(layer.self_attn) else None,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)

    @staticmethod
    def _default_position_ids(
        inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None
    ) -> torch.LongTensor:
        q_len = inputs_embeds.shape[1]
        if _is_2d(attention_mask):
            counted = attention_mask.long().cumsum(-1) - 1  # (B, Tk): index among the row's real tokens
            return counted.clamp_min(0)[:, -q_len:]
        past = cache.get_seq_length() if cache is not None else 0
        return (torch.arange(q_len, device=inputs_embeds.device) + past).unsqueeze(0)


class MyLLMForCausalLM(MyLLMPreTrainedModel, GenerationMixin):
    """MyLLM with a language-model head; HF-compatible loss, caches, ``generate`` and MoE outputs."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MyLLMConfig) -> None:
        super().__init__(config)
        self.model = MyLLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.myllm_surgeries:  # e.g. added expert groups: rebuilt structurally, weights come from the checkpoint
            from myllm.factory import recipe

            recipe.replay(self)
        self.post_init()

    @classmethod
    def from_hf(cls, model: PreTrainedModel, *, attn_implementation: str | None = None) -> MyLLMForCausalLM:
        """Import an HF causal LM (Llama, Mistral, Qwen2, Qwen3, and whatever ``HF_CONVERTERS`` holds).

        See :func:`myllm.models.convert.from_hf`.
        """
        from myllm.models.convert import from_hf

        return from_hf(model, attn_implementation=attn_implementation)

    def to_hf(self, model_type: str | None = None) -> PreTrainedModel:
        """Export to the HF architecture it was imported from (or ``model_type``); see ``convert.to_hf``."""
        from myllm.models.convert import to_hf

        return to_hf(self, model_type)

    def moe_modules(self) -> list[nn.Module]:
        """Every module with ``is_moe = True`` (MoE / Chain-of-Experts FFNs), in model order."""
        return [m for m in self.modules() if getattr(m, "is_moe", False)]

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> MoeCausalLMOutputWithPast:
        """``input_ids [B, T]`` -> ``logits [B, T', V]`` (``T'`` per ``logits_to_keep``), loss and MoE outputs.

        Args:
            labels: ``[B, T]`` *unshifted* targets (the loss shifts them once), ``-100`` where no loss is taken.
            logits_to_keep: ``k > 0`` keeps the last ``k`` positions (``generate`` uses 1); a tensor keeps those
                positions.
            output_router_logits: return ``router_logits`` (one ``[B*T, E]`` per MoE layer) and ``aux_loss``.
            kwargs: ``num_items_in_batch`` (tokens with a loss in the whole gradient-accumulation step: the loss
                is then ``sum / num_items_in_batch``), and transformers' usual ``output_*`` flags.

        The loss is transformers' ``ForCausalLMLoss`` plus, when the model has MoE blocks, the sum of their
        ``aux_loss(attention_mask)`` (also returned as ``aux_loss``).
        """
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        aux_loss = router_logits = None
        if labels is not None or output_router_logits:
            moe = self.moe_modules()
            if moe:
                token_mask = attention_mask[:, -hidden_states.shape[1] :] if _is_2d(attention_mask) else None
                aux_loss = torch.stack([m.aux_loss(token_mask).float() for m in moe]).sum()
                if loss is not None:
                    loss = loss + aux_loss.to(loss.device)
                if output_router_logits:
                    router_logits = tuple(m.last_router_logits for m in moe)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=router_logits,
        )

    def _prepare_cache_for_generation(
        self,
        generation_config: Any,
        model_kwargs: dict,
        generation_mode: Any,
        batch_size: int,
        max_cache_length: int,
    ) -> None:
        """Build ``generate``'s cache through the registry's cache blocks.

        ``generation_config.cache_implementation`` (or, when unset, the config's ``kv_cache`` spec) names the
        cache block; blocks with a ``max_cache_len`` field get the length ``generate`` needs. Names that are not
        registered cache blocks (``offloaded``, ``quantized`` ...) and user-supplied caches go to transformers.
        """
        name = generation_config.cache_implementation or self.config.kv_cache["name"]
        if (
            model_kwargs.get("cache") is not None
            or generation_config.use_cache is False
            or name not in registry.available("cache")
        ):
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        spec = registry.get("cache", name)
        kwargs = (
            {k: v for k, v in self.config.kv_cache.items() if k != "name"}
            if name == self.config.kv_cache["name"]
            else {}
        )
        if "max_cache_len" in spec.config.model_fields:
            kwargs["max_cache_len"] = max(
                max_cache_length, generation_config.max_cache_len or 0, kwargs.get("max_cache_len", 0)
            )
        model_kwargs["cache"] = spec.build(config=self.config, **kwargs)


def _take_over_submodules(new: nn.Module, old: nn.Module) -> None:
    """Move ``old``'s child modules into ``new`` (kernel variants have the same children and nothing else)."""
    new_children, old_children = dict(new.named_children()), dict(old.named_children())
    own = [n for n, _ in new.named_parameters(recurse=False)] + [n for n, _ in new.named_buffers(recurse=False)]
    if new_children.keys() != old_children.keys() or own:
        raise ValueError(
            f"{type(new).__name__} cannot take over {type(old).__name__}: submodules {sorted(new_children)} vs "
            f"{sorted(old_children)}, own tensors {own}"
        )
    for name, child in old_children.items():
        setattr(new, name, child)
    new.train(old.training)


def _is_2d(mask: torch.Tensor | None) -> bool:
    return isinstance(mask, torch.Tensor) and mask.dim() == 2


__all__ = ["MyLLMDecoderLayer", "MyLLMForCausalLM", "MyLLMModel", "MyLLMPreTrainedModel"]
