"""The registry itself, and smoke tests parametrized over every registered block.

Blocks added by later modules are picked up automatically through ``myllm.blocks.specs()``.
"""

from __future__ import annotations

import pydantic
import pytest
import torch
from torch import nn

import myllm  # noqa: F401  (registers every block)
from myllm import blocks
from myllm.blocks.registry import BlockConfig, register

MODULE_SPECS = [s for s in blocks.specs() if s.kind != "cache"]


def _ids(spec):
    return f"{spec.kind}/{spec.name}"


def _forward(spec, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("spec", blocks.specs(), ids=_ids)
def test_every_block_has_an_example(spec):
    assert spec.example is not None, f"{spec.kind}/{spec.name} registers no example kwargs"
    spec.validate(**spec.example())


@pytest.mark.parametrize("spec", MODULE_SPECS, ids=_ids)
def test_block_smoke_shape_finite_and_all_params_get_grads(spec):
    kwargs = spec.example()
    module = spec.build(**kwargs).train()
    h = kwargs["hidden_size"]
    x = torch.randn(2, 7, h, requires_grad=True)
    y = _forward(spec, module, x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    y.float().pow(2).mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} received no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} gradient not finite"
            assert p.grad.abs().sum() > 0, f"{name} gradient is identically zero"


@pytest.mark.parametrize("spec", blocks.specs("cache"), ids=_ids)
def test_cache_blocks_store_and_return_keys(spec):
    cache = spec.build(**spec.example())
    k = torch.randn(1, 2, 3, 8)
    v = torch.randn(1, 2, 3, 8)
    k_all, v_all = cache.update(k, v, 0)
    assert cache.get_seq_length(0) == 3
    torch.testing.assert_close(k_all[:, :, :3], k)
    torch.testing.assert_close(v_all[:, :, :3], v)


def test_available_lists_registered_names():
    assert {"eager", "sdpa"} <= set(blocks.available("attention"))
    assert "dense" in blocks.available("ffn")
    assert {"rmsnorm", "layernorm", "deepnorm"} <= set(blocks.available("norm"))
    assert {"dynamic", "static"} <= set(blocks.available("cache"))


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(blocks.RegistryError, match="valid kinds: attention, ffn, norm, cache"):
        blocks.available("mlp")
    with pytest.raises(KeyError):
        blocks.build("mlp", "dense")


def test_unknown_name_lists_valid_names():
    with pytest.raises(blocks.RegistryError, match=r"available ffn blocks: .*dense"):
        blocks.build("ffn", "swigloo", hidden_size=8, intermediate_size=8)


def test_names_are_normalised():
    assert blocks.get("norm", "RMSNorm") is blocks.get("norm", "rmsnorm")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"hidden_size": 0, "intermediate_size": 8}, "hidden_size"),  # out of range
        ({"hidden_size": "wide", "intermediate_size": 8}, "hidden_size"),  # wrong type
        ({"hidden_size": 8, "intermediate_size": 8, "widht": 3}, "widht"),  # unknown keyword
        ({"hidden_size": 8, "intermediate_size": 8, "act": "swishy"}, "act"),  # unknown activation
    ],
)
def test_bad_keywords_raise_validation_error_naming_the_field(kwargs, field):
    with pytest.raises(pydantic.ValidationError) as exc:
        blocks.build("ffn", "dense", **kwargs)
    assert field in str(exc.value)


def test_bad_attention_sizes_are_rejected():
    with pytest.raises(pydantic.ValidationError, match="divisible by num_kv_heads"):
        blocks.build("attention", "sdpa", hidden_size=32, num_heads=4, num_kv_heads=3)
    with pytest.raises(pydantic.ValidationError, match="pass head_dim"):
        blocks.build("attention", "sdpa", hidden_size=30, num_heads=4)


def test_duplicate_registration_is_an_error():
    class Cfg(BlockConfig):
        hidden_size: int

    with pytest.raises(blocks.RegistryError, match="already registered"):
        register("ffn", "dense", config=Cfg)(nn.Identity)
    # and nothing was replaced
    assert blocks.get("ffn", "dense").config is not Cfg


def test_register_requires_a_block_config():
    with pytest.raises(TypeError, match="BlockConfig"):
        register("ffn", "some_new_block", config=dict)  # type: ignore[arg-type]


def test_unregister_removes_a_block_and_unknown_names_are_errors():
    class Cfg(BlockConfig):
        hidden_size: int

    register("ffn", "temporary_block", config=Cfg)(nn.Identity)
    assert "temporary_block" in blocks.available("ffn")
    assert blocks.unregister("ffn", "temporary_block").builder is nn.Identity
    assert "temporary_block" not in blocks.available("ffn")
    with pytest.raises(blocks.RegistryError, match="available ffn blocks"):
        blocks.unregister("ffn", "temporary_block")
