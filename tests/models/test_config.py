"""MyLLMConfig: block specs, per-layer overrides, derived sizes, serialisation, attn_implementation, bad input."""

from __future__ import annotations

import json

import pytest
import transformers
from utils import TINY_MYLLM

from myllm import MyLLMConfig
from myllm.blocks import registry


def cfg(**overrides):
    return MyLLMConfig(**{**TINY_MYLLM, **overrides})


def test_defaults_and_shorthand_specs_are_normalised():
    c = cfg(attention="SDPA", norm={"name": "RMSNorm"})
    assert c.attention == {"name": "sdpa"}
    assert c.ffn == {"name": "dense"}
    assert c.norm == {"name": "rmsnorm"}
    assert c.kv_cache == {"name": "dynamic"}
    assert c.layer_overrides == {}
    assert c.head_dim == 8 and c.num_key_value_heads == 2


def test_sizes_are_derived_from_the_model_config_and_spec_kwargs_win():
    c = cfg(
        ffn={"name": "dense", "intermediate_size": 48, "act": "gelu"}, attention={"name": "sdpa", "qkv_bias": True}
    )
    name, kw = c.resolve_block("attention", 1)
    assert name == "sdpa"
    assert kw["hidden_size"] == 32 and kw["num_heads"] == 4 and kw["num_kv_heads"] == 2 and kw["head_dim"] == 8
    assert kw["layer_idx"] == 1 and kw["qkv_bias"] is True
    assert kw["rope_parameters"] == c.rope_parameters
    name, kw = c.resolve_block("ffn", 0)
    assert kw == {"hidden_size": 32, "intermediate_size": 48, "act": "gelu"}  # dense has no layer_idx field
    name, kw = c.resolve_block("norm")
    assert kw == {"hidden_size": 32, "eps": c.rms_norm_eps}  # only the fields rmsnorm declares
    assert c.resolve_block("norm", 0)[1] == kw
    deep = cfg(norm="deepnorm").resolve_block("norm", 0)[1]
    assert deep["num_layers"] == 2


def test_layer_overrides_replace_the_slot_spec_for_that_layer_only():
    c = cfg(
        ffn={"name": "dense", "intermediate_size": 48},
        layer_overrides={1: {"ffn": "dense", "attention": {"name": "eager"}}},
    )
    assert c.layer_overrides == {"1": {"ffn": {"name": "dense"}, "attention": {"name": "eager"}}}
    assert c.resolve_block("ffn", 0)[1]["intermediate_size"] == 48
    assert c.resolve_block("ffn", 1)[1]["intermediate_size"] == 64  # replaced, not merged
    assert c.block_spec("attention", 0)["name"] == "sdpa"
    assert c.block_spec("attention", 1)["name"] == "eager"


def test_config_json_round_trip(tmp_path):
    c = cfg(attention={"name": "sdpa", "qkv_bias": True}, layer_overrides={"0": {"norm": "layernorm"}})
    c.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "myllm"
    assert raw["layer_overrides"] == {"0": {"norm": {"name": "layernorm"}}}
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(back, MyLLMConfig)
    for key in ("attention", "ffn", "norm", "kv_cache", "layer_overrides", "rope_parameters"):
        assert getattr(back, key) == getattr(c, key)


def test_attn_implementation_is_a_view_of_the_specs():
    assert cfg()._attn_implementation == "sdpa"
    assert cfg(attention="eager")._attn_implementation == "eager"
    mixed = cfg(layer_overrides={"0": {"attention": "eager"}})
    assert mixed._attn_implementation == "sdpa"  # the mask format every kernel accepts
    assert sorted(mixed.kernel_variants()) == ["eager", "sdpa"]


def test_setting_attn_implementation_switches_kernel_variants_in_every_layer():
    c = cfg(attention={"name": "sdpa", "qkv_bias": True}, layer_overrides={"1": {"attention": "eager"}})
    c._attn_implementation = "eager"
    assert c.attention == {"name": "eager", "qkv_bias": True}  # kwargs kept
    assert c.layer_overrides["1"]["attention"] == {"name": "eager"}
    assert c._attn_implementation == "eager"
    built = cfg(attn_implementation="eager")  # the same through the constructor (what from_pretrained does)
    assert built.attention["name"] == "eager"


def test_switched_attention_is_pure():
    c = cfg()
    attention, overrides = c.switched_attention("eager")
    assert attention == {"name": "eager"} and c.attention == {"name": "sdpa"}


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"attention": "flash"}, r"layer 0 attention block 'flash'.*available attention blocks: .*eager"),
        ({"ffn": {"name": "dense", "widht": 3}}, r"layer 0 ffn block 'dense'.*widht"),
        ({"ffn": {"name": "dense", "act": "swishy"}}, r"ffn block 'dense'.*act"),
        ({"num_key_value_heads": 3}, r"attention.*divisible by num_kv_heads"),
        ({"norm": "mlp"}, r"norm block 'mlp'.*available norm blocks"),
        ({"attention": {"kwargs": {}}}, r"a dict with a 'name' key"),
        ({"attention": {"name": "sdpa", "bad": object()}}, r"not JSON-serialisable"),
        ({"layer_overrides": {"7": {"ffn": "dense"}}}, r"layer 7 is out of range"),
        ({"layer_overrides": {"x": {"ffn": "dense"}}}, r"'x' is not an integer"),
        (
            {"layer_overrides": {"0": {"mlp": "dense"}}},
            r"unknown slot\(s\) \['mlp'\]; valid slots: attention, ffn, norm",
        ),
        ({"layer_overrides": {"0": "dense"}}, r"must be a dict"),
        (
            {"layer_overrides": {"1": {"ffn": {"name": "dense", "intermediate_size": -1}}}},
            r"layer 1 ffn.*intermediate_size",
        ),
        ({"kv_cache": "paged"}, r"unknown kv_cache block 'paged'; available cache blocks: .*dynamic.*static"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match="(?s)" + message):
        cfg(**kwargs)


def test_norm_blocks_need_a_placement_capability():
    class NoPlacementCfg(registry.BlockConfig):
        hidden_size: int

    registry.register("norm", "test_no_placement", config=NoPlacementCfg)(lambda *, hidden_size: None)
    try:
        with pytest.raises(ValueError, match="no `placement` capability"):
            cfg(norm="test_no_placement")
    finally:
        registry.unregister("norm", "test_no_placement")


@pytest.mark.parametrize("name", ["flash_attention_2", "moba", "nope"])
def test_switching_to_a_non_variant_lists_the_valid_ones(name):
    c = cfg()
    with pytest.raises(ValueError, match=r"valid: eager, sdpa"):
        c._attn_implementation = name
    assert c.attention == {"name": "sdpa"}  # unchanged
    with pytest.raises(ValueError, match=r"valid: eager, sdpa"):
        cfg(attn_implementation=name)


def test_unknown_slot_for_block_spec():
    with pytest.raises(ValueError, match="unknown slot 'mlp'"):
        cfg().block_spec("mlp", 0)
