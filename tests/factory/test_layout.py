"""Slot tables, the structural fallback, layer selection and the targets= escape hatch."""

from __future__ import annotations

import pytest
import torch
import transformers
from utils import TINY_CONFIGS, tiny_hf_model

import myllm  # noqa: F401
from myllm.factory import SLOT_TABLE, LayoutError, resolve_layout, select_layers
from myllm.factory.layout import discover_layout, explicit_targets, slot_targets

ARCHS = list(TINY_CONFIGS)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tabled_architecture_resolves_all_slots(arch):
    model = tiny_hf_model(arch)
    assert model.config.model_type in SLOT_TABLE
    layout = resolve_layout(model)
    n = model.config.num_hidden_layers
    for kind, per_layer in (("attention", 1), ("ffn", 1), ("norm", 2)):
        _, targets = slot_targets(model, kind)
        extra = 1 if kind == "norm" else 0  # the final norm
        assert len(targets) == n * per_layer + extra
        assert all(t.module is model.get_submodule(t.path) for t in targets)
    # the structural fallback finds the same layout on the Llama-like ones (MLA has no k_proj/v_proj)
    assert discover_layout(model) == (None if arch == "deepseek_v3" else layout)


def _gemma():
    cfg = transformers.GemmaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GemmaForCausalLM(cfg).eval()


def test_structural_fallback_recognises_untabled_llama_like_model():
    model = _gemma()
    assert model.config.model_type not in SLOT_TABLE
    layout = resolve_layout(model)
    assert layout.layers == "model.layers" and layout.attention == "self_attn" and layout.ffn == "mlp"
    assert layout.slots["norm"] == ("input_layernorm", "post_attention_layernorm")
    assert layout.final_norm == "model.norm"


def test_unrecognised_model_error_names_supported_types_and_targets():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128))
    with pytest.raises(LayoutError, match=r"no slot table.*llama.*qwen2_moe.*targets="):
        resolve_layout(model)


@pytest.mark.parametrize(
    "layers, expected",
    [
        (None, [0, 1, 2, 3]),
        (2, [2]),
        ([3, 0], [0, 3]),
        (range(1, 3), [1, 2]),
        (lambda i: i % 2 == 0, [0, 2]),
        (-1, [3]),
    ],
    ids=["all", "int", "list", "range", "predicate", "negative"],
)
def test_select_layers_forms(layers, expected):
    assert select_layers(layers, 4) == expected


@pytest.mark.parametrize(
    "layers, match",
    [(4, "out of range"), ([0, -5], "out of range"), ([1, 1], "duplicates"), (lambda i: False, "no layer"),
     (["0"], "must be ints"), ([True], "must be ints")],
)  # fmt: skip
def test_select_layers_rejects_bad_values(layers, match):
    with pytest.raises(LayoutError, match=match):
        select_layers(layers, 4)


def test_targets_regex_list_and_predicate():
    model = tiny_hf_model("llama")
    by_regex = explicit_targets(model, r"model\.layers\.\d+\.mlp")
    assert [t.path for t in by_regex] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert [t.layer_idx for t in by_regex] == [0, 1]
    by_list = explicit_targets(model, [r"model\.layers\.1\.mlp", r"model\.norm"])
    assert [t.path for t in by_list] == ["model.layers.1.mlp", "model.norm"]
    by_pred = explicit_targets(model, lambda path, m: path.endswith("self_attn") and "1" in path)
    assert [t.path for t in by_pred] == ["model.layers.1.self_attn"]
    with pytest.raises(LayoutError, match="matched no module"):
        explicit_targets(model, r"nothing\.here")


def test_unknown_slot_kind():
    model = tiny_hf_model("llama")
    with pytest.raises(LayoutError, match="valid kinds: attention, ffn, norm"):
        slot_targets(model, "mlp")
    with pytest.raises(LayoutError, match="caches are not model slots"):
        slot_targets(model, "cache")
