"""Shared test helpers: closeness metrics and tiny random models of real Hugging Face architectures."""

from __future__ import annotations

from typing import Any

import torch
import transformers

# Tiny configurations of real architectures. Sizes are multiples of 4 so that torch._grouped_mm's 16-byte
# alignment holds in fp32; tests that want odd sizes override them.
_TINY_COMMON: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None, "head_dim": 8}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v bias
    "qwen3": ("Qwen3Config", {"head_dim": 8}),  # q/k norm
    # sliding-window attention: every layer (Mistral), or layers >= max_window_layers (Qwen2)
    "mistral_swa": ("MistralConfig", {"sliding_window": 3, "head_dim": 8}),
    "qwen2_swa": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 32,
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "head_dim": 8},
    ),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "deepseek_v3": (
        "DeepseekV3Config",
        {
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "n_group": 2,
            "topk_group": 1,
            "moe_intermediate_size": 16,
            "first_k_dense_replace": 1,
            "kv_lora_rank": 16,
            "q_lora_rank": None,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 8,
            "num_key_value_heads": 4,
        },
    ),
}

CAUSAL_LM_CLASSES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mistral_swa": "MistralForCausalLM",
    "qwen2_swa": "Qwen2ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


def tiny_hf_config(arch: str, **overrides: Any) -> transformers.PreTrainedConfig:
    """A tiny config of a real HF architecture (``llama``, ``qwen2``, ``mixtral``, ...)."""
    cls_name, extra = TINY_CONFIGS[arch]
    kwargs = {**_TINY_COMMON, **extra, **overrides}
    return getattr(transformers, cls_name)(**kwargs)


def tiny_hf_model(arch: str, *, seed: int = 0, attn_implementation: str = "sdpa", **overrides: Any):
    """A tiny randomly initialised HF causal LM of ``arch`` in float32 eval mode.

    Weights are perturbed away from their (often trivial) init values so that norms, biases and routers
    are exercised: a test that passes with all-ones norms could miss a swapped weight.
    """
    config = tiny_hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, CAUSAL_LM_CLASSES[arch])._from_config(
        config, attn_implementation=attn_implementation, dtype=torch.float32
    )
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for _name, p in model.named_parameters():
            if p.dim() == 1:  # norms and biases
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.eval()


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative RMS error ``||a - e|| / max(||e||, tiny)`` in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float = 1e-5, rtol: float = 0.0) -> None:
    """Max-abs closeness with a message that reports max abs diff and relative RMS."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.detach().double() - expected.detach().double()).abs()
    bound = atol + rtol * expected.detach().double().abs()
    assert bool((diff <= bound).all()), (
        f"max abs diff {diff.max().item():.3e} > atol {atol:.1e} (+ rtol {rtol:.1e}); rel rms {rel_rms(actual, expected):.3e}"
    )


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


# --- model surgery helpers (factory / surgery tests) ---------------------------------------------------------


def model_snapshot(model: torch.nn.Module) -> dict[str, Any]:
    """Everything a failed surgery must leave untouched: module objects by path, classes, tensors, config."""
    return {
        "modules": {name: (id(m), type(m)) for name, m in model.named_modules()},
        "params": {name: id(p) for name, p in model.named_parameters()},
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "class": type(model),
        "config_class": type(model.config),
        "config": model.config.to_json_string(use_diff=False),
    }


def assert_unchanged(model: torch.nn.Module, snap: dict[str, Any]) -> None:
    """The model is exactly as in ``snap``: same objects at the same paths, bit-identical state, same config."""
    now = model_snapshot(model)
    assert now["class"] is snap["class"] and now["config_class"] is snap["config_class"]
    assert now["modules"] == snap["modules"], "module structure changed"
    assert now["params"] == snap["params"], "parameter objects changed"
    assert now["state"].keys() == snap["state"].keys(), "state-dict keys changed"
    for k, v in snap["state"].items():
        assert now["state"][k].dtype == v.dtype and torch.equal(now["state"][k], v), f"{k} changed"
    assert now["config"] == snap["config"], "config changed"


def tokens(batch: int = 2, length: int = 9, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- MyLLM
TINY_MYLLM: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def tiny_myllm(*, seed: int = 0, **overrides: Any):
    """A tiny randomly initialised ``MyLLMForCausalLM`` in float32 eval mode (norm weights and biases perturbed)."""
    from myllm import MyLLMConfig, MyLLMForCausalLM

    torch.manual_seed(seed)
    model = MyLLMForCausalLM(MyLLMConfig(**{**TINY_MYLLM, **overrides}))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def left_pad_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens (what ``generate`` computes for left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def hf_moe_block(arch: str, *, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """The sparse MoE block of a tiny HF ``arch`` model (``qwen2_moe``, ``qwen3_moe``, ``mixtral``, ``deepseek_v3``).

    Its weights are re-drawn at unit-ish scale (std ``1/sqrt(fan_in)``, routers included) so that outputs
    are O(1) and a 1e-5 tolerance means something; DeepSeek's ``e_score_correction_bias`` gets O(0.1) values.
    """
    model = tiny_hf_model(arch, seed=seed, **overrides)
    block = next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate"))
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        for name, b in block.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return block.float()


def parity_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [2, 8], attention_mask [2, 8])``; row 1 left-padded by 3."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 128, (2, 8), generator=g)
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding
    return x, mask


def hf_parity(hf: torch.nn.Module, ours: torch.nn.Module) -> dict[str, float]:
    """Max abs logit difference in three settings (real tokens only where there is padding)."""
    x, mask = parity_inputs()
    pos = left_pad_positions(mask)
    real = mask.bool()
    with torch.no_grad():
        full = max_abs_diff(ours(x).logits, hf(x).logits)
        padded = max_abs_diff(
            ours(x, attention_mask=mask, position_ids=pos).logits[real],
            hf(x, attention_mask=mask, position_ids=pos).logits[real],
        )
        # incremental decoding: prefill 5 tokens, then one token at a time through the cache
        c_ours = c_hf = None
        cached = 0.0
        for start, stop in [(0, 5), (5, 6), (6, 7), (7, 8)]:
            kw = dict(attention_mask=mask[:, :stop], position_ids=pos[:, start:stop], use_cache=True)
            a = ours(x[:, start:stop], cache=c_ours, **kw)
            b = hf(x[:, start:stop], cache=c_hf, **kw)
            c_ours, c_hf = a.cache, b.cache
            rows = real[:, start:stop]
            cached = max(cached, max_abs_diff(a.logits[rows], b.logits[rows]))
    return {"full": full, "left padding": padded, "cache": cached}
