"""HF <-> ``moe`` mappings: config to kwargs, state dicts both ways, and options HF cannot express."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close, hf_moe_block, tiny_hf_config

from myllm.blocks.ffn.moe import MoE
from myllm.blocks.ffn.moe.hf import (
    HF_MOE_ADAPTERS,
    hf_config_from_moe_kwargs,
    moe_kwargs_from_hf,
    moe_state_dict_from_hf,
    moe_state_dict_to_hf,
)

ARCHS = ["qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_round_trip_is_exact(arch):
    hf = hf_moe_block(arch)
    cfg = hf.experts.config
    ours = MoE(**moe_kwargs_from_hf(cfg))
    ours.load_state_dict(moe_state_dict_from_hf(arch, hf.state_dict()), strict=True)
    back = moe_state_dict_to_hf(arch, ours.state_dict())
    hf_state = hf.state_dict()
    assert set(back) == set(hf_state)
    for key, value in hf_state.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("arch", ARCHS)
def test_config_round_trip(arch):
    cfg = tiny_hf_config(arch)
    fields = hf_config_from_moe_kwargs(arch, moe_kwargs_from_hf(cfg))
    for key, value in fields.items():
        assert getattr(cfg, key) == value, key


def test_switch_coefficient_follows_output_router_logits():
    on = tiny_hf_config("mixtral", output_router_logits=True, router_aux_loss_coef=0.02)
    off = tiny_hf_config("mixtral", router_aux_loss_coef=0.02)
    assert moe_kwargs_from_hf(on)["balance"] == {"switch": 0.02}
    assert moe_kwargs_from_hf(off)["balance"] == {}
    fields = hf_config_from_moe_kwargs("mixtral", moe_kwargs_from_hf(on))
    assert fields["router_aux_loss_coef"] == 0.02 and fields["output_router_logits"] is True


@pytest.mark.parametrize(
    "arch, change, option",
    [
        ("qwen2_moe", {"temperature": 2.0}, "temperature"),
        ("mixtral", {"norm_topk_prob": False}, "norm_topk_prob"),
        ("mixtral", {"balance": {"loss_free": 1e-3}}, "score_correction_bias"),
        ("qwen3_moe", {"n_shared_experts": 1}, "n_shared_experts"),
        ("deepseek_v3", {"score_func": "softmax"}, "score_func"),
    ],
)
def test_options_hf_cannot_express_are_refused(arch, change, option):
    kwargs = {**moe_kwargs_from_hf(tiny_hf_config(arch)), **change}
    with pytest.raises(ValueError, match=f"{arch} cannot express this MoE block: .*{option}"):
        hf_config_from_moe_kwargs(arch, kwargs)


def test_loss_free_deepseek_block_maps_back():
    kwargs = {**moe_kwargs_from_hf(tiny_hf_config("deepseek_v3")), "balance": {"loss_free": 1e-3}}
    assert hf_config_from_moe_kwargs("deepseek_v3", kwargs)["n_group"] == 2


def test_unknown_model_type_lists_the_supported_ones():
    with pytest.raises(KeyError, match="supported: deepseek_v3, mixtral, qwen2_moe, qwen3_moe"):
        moe_state_dict_from_hf("llama", {})
    assert sorted(HF_MOE_ADAPTERS) == sorted(ARCHS)


def test_tensors_are_not_copied():
    hf = hf_moe_block("qwen2_moe")
    state = hf.state_dict()
    mapped = moe_state_dict_from_hf("qwen2_moe", state)
    assert mapped["shared_experts.gate_proj.weight"] is state["shared_expert.gate_proj.weight"]
    assert_close(mapped["experts.gate_up_proj"], state["experts.gate_up_proj"], atol=0)
