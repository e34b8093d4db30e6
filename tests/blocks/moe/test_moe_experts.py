"""Routed experts: the fast path (grouped GEMM or its loop fallback) against the plain reference and HF.

Outputs AND gradients (input, both fused weights, routing weights) are compared, odd sizes included.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from utils import assert_close, tiny_hf_config

from myllm.blocks.ffn.moe import Experts, kernels
from myllm.blocks.ffn.moe.dispatch import dispatch
from myllm.blocks.ffn.moe.kernels import fused_experts, grouped_mm_usable


def _experts(n_experts: int, hidden: int, inter: int, act: str = "silu", seed: int = 0) -> Experts:
    torch.manual_seed(seed)
    ex = Experts(n_experts=n_experts, hidden_size=hidden, intermediate_size=inter, act=act)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, hidden**-0.5)
        ex.down_proj.normal_(0, inter**-0.5)
    return ex


def _routing(n: int, n_experts: int, k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(n)]) if n else torch.zeros(0, k)
    w = torch.rand(n, k, generator=g)
    return idx.long(), w.requires_grad_()


def _run(ex: Experts, x, idx, w, *, impl: str, use_grouped_mm: bool | None = None):
    """Output and gradients w.r.t. (x, gate_up_proj, down_proj, w) of ``impl`` for a fixed upstream grad."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    plan = dispatch(idx, w, ex.n_experts)
    if impl == "reference":
        y = ex.reference(x, plan)
    else:
        y = fused_experts(
            x, ex.gate_up_proj, ex.down_proj, plan.token, plan.weights, plan.counts, plan.offsets, ex.act,
            use_grouped_mm=use_grouped_mm,
        )  # fmt: skip
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    params = (x, ex.gate_up_proj, ex.down_proj, w)
    grads = torch.autograd.grad(y, params, upstream, allow_unused=True)
    return y.detach(), grads


def _check_same(ex, x, idx, w, **kw):
    y_ref, g_ref = _run(ex, x, idx, w, impl="reference")
    y, g = _run(ex, x, idx, w, impl="fast", **kw)
    assert_close(y, y_ref, atol=2e-5)
    for name, a, b, p in zip(
        ("x", "gate_up_proj", "down_proj", "weights"), g, g_ref, (x, *ex.parameters(), w), strict=True
    ):
        assert a is not None and a.shape == p.shape, name  # the fast path always returns full gradients
        assert_close(a, torch.zeros_like(p) if b is None else b, atol=5e-5)


@pytest.mark.parametrize(
    "n, e, k, h, i, grouped",
    [
        (37, 8, 2, 32, 16, True),  # aligned: grouped_mm
        (37, 8, 2, 32, 16, False),  # same sizes through the loop fallback
        (63, 5, 3, 30, 13, None),  # odd sizes: the fallback must be chosen automatically
        (1, 4, 4, 12, 8, True),  # one token, every expert
        (1, 3, 3, 10, 6, None),  # one token, odd sizes
        (16, 64, 8, 16, 4, True),  # many experts, most empty
    ],
    ids=["aligned-gmm", "aligned-loop", "odd-auto", "one-token", "one-token-odd", "many-experts"],
)
def test_fast_path_matches_reference_outputs_and_grads(n, e, k, h, i, grouped):
    ex = _experts(e, h, i)
    if grouped is None:
        assert not grouped_mm_usable(ex.gate_up_proj, ex.down_proj)  # H=30 / I=13: not 16-byte aligned
    x = torch.randn(n, h)
    idx, w = _routing(n, e, k)
    _check_same(ex, x, idx, w, use_grouped_mm=grouped)


@pytest.mark.parametrize("chunk_bytes", [1, 600], ids=["one-expert-per-chunk", "few-experts-per-chunk"])
def test_chunked_cpu_path_matches_reference(chunk_bytes, monkeypatch):
    """The CPU path splits rows into chunks of whole experts; any chunking gives the same results."""
    monkeypatch.setattr(kernels, "CHUNK_BYTES", chunk_bytes)
    ex = _experts(7, 16, 8)
    x = torch.randn(45, 16)
    idx, w = _routing(45, 7, 3)
    plan = dispatch(idx, w, 7)
    max_rows = max(1, chunk_bytes // (16 * 4))
    chunks = kernels.plan_chunks(plan.counts.tolist(), plan.offsets, 45 * 3, max_rows)
    assert len(chunks) > 1 and chunks[-1].r1 == 45 * 3
    assert [c.e0 for c in chunks[1:]] == [c.e1 for c in chunks[:-1]]  # consecutive, whole experts
    _check_same(ex, x, idx, w, use_grouped_mm=False)


def test_non_silu_activation_uses_generic_backward():
    ex = _experts(4, 16, 8, act="gelu_pytorch_tanh")
    x = torch.randn(21, 16)
    idx, w = _routing(21, 4, 2)
    _check_same(ex, x, idx, w)


def test_detects_a_wrong_expert_weight():
    """Non-vacuity: the comparison above fails when one expert's weights differ."""
    ex = _experts(4, 16, 8)
    x = torch.randn(21, 16)
    idx, w = _routing(21, 4, 2)
    y_ref, _ = _run(ex, x, idx, w, impl="reference")
    with torch.no_grad():
        ex.down_proj[int(idx[0, 0])] += 0.01
    y, _ = _run(ex, x, idx, w, impl="fast")
    with pytest.raises(AssertionError, match="max abs diff"):
        assert_close(y, y_ref, atol=2e-5)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 40),
    e=st.integers(1, 9),
    data=st.data(),
    h=st.sampled_from([8, 12, 15, 16]),
    i=st.sampled_from([4, 7, 8]),
)
def test_property_fast_equals_reference(n, e, data, h, i):
    k = data.draw(st.integers(1, e))
    ex = _experts(e, h, i, seed=n)
    x = torch.randn(n, h)
    idx, w = _routing(n, e, k, seed=n + e)
    _check_same(ex, x, idx, w)


def test_idle_experts_still_get_full_zero_gradients():
    """ZeRO-3 safety: both fused parameters always take part in backward, idle experts with zero grads."""
    ex = _experts(6, 16, 8)
    x = torch.randn(10, 16)
    idx = torch.tensor([[0, 1]] * 10)  # experts 2..5 idle
    w = torch.rand(10, 2)
    ex(x, idx, w).pow(2).sum().backward()
    for p in (ex.gate_up_proj, ex.down_proj):
        assert p.grad is not None and p.grad.shape == p.shape
        assert p.grad[2:].abs().sum() == 0 and p.grad[:2].abs().sum() > 0


@pytest.mark.parametrize("impl", ["grouped", "eager"])
def test_no_tokens_keeps_parameters_in_the_graph(impl):
    ex = _experts(4, 16, 8)
    ex.impl = impl
    x = torch.randn(0, 16, requires_grad=True)
    y = ex(x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert y.shape == (0, 16)
    (y.sum() + 0.0 * x.sum()).backward()
    assert ex.gate_up_proj.grad is not None and ex.down_proj.grad is not None


@pytest.mark.parametrize("hf_impl", ["eager", "grouped_mm"])
def test_matches_hf_fused_experts(hf_impl):
    """HF's own experts module (same fused layout) is the reference: outputs and weight gradients."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

    cfg = tiny_hf_config("qwen2_moe", experts_implementation=hf_impl)
    hf = Qwen2MoeExperts(cfg)
    ours = _experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(29, cfg.hidden_size)
    idx, w = _routing(29, cfg.num_experts, cfg.num_experts_per_tok)
    upstream = torch.randn(29, cfg.hidden_size)
    y_hf = hf(x, idx, w.detach())
    y = ours(x, idx, w.detach())
    assert_close(y, y_hf, atol=1e-5)
    g_hf = torch.autograd.grad(y_hf, (hf.gate_up_proj, hf.down_proj), upstream)
    g = torch.autograd.grad(y, (ours.gate_up_proj, ours.down_proj), upstream)
    for a, b in zip(g, g_hf, strict=True):
        assert_close(a, b, atol=1e-5)


def test_bfloat16_close_to_float32():
    ex = _experts(4, 16, 8)
    x = torch.randn(33, 16)
    idx, w = _routing(33, 4, 2)
    y32 = ex(x, idx, w.detach())
    y16 = ex.to(torch.bfloat16)(x.bfloat16(), idx, w.detach())
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).abs().max() < 0.05 * y32.abs().max()
