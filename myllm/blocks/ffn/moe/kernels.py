"""Fast routed-experts kernel: gather -> grouped GEMM -> gated activation -> grouped GEMM -> weighted scatter.

One autograd node does the ``experts`` and ``combine`` stages for all experts at once, on rows already
sorted by expert (:func:`myllm.blocks.ffn.moe.dispatch.dispatch`). Compared with composing the same steps
from autograd ops it saves the intermediate copies autograd would keep (the gathered input is recomputed
in backward, only the up-projection output ``h [S, 2I]`` and the weighted activation ``[S, I]`` are kept)
and folds the routing weight into the activation before the down projection (``[S, I]`` instead of
``[S, H]`` work). The weight gradients are always full ``[E, ...]`` tensors (zeros for experts that got no
rows), so every expert parameter takes part in every backward: ranks of a ZeRO-3 job never disagree on
which parameters produced gradients.

Grouped GEMMs use ``torch.nn.functional.grouped_mm`` (or ``torch._grouped_mm``) when the device, dtype and
16-byte alignment allow; otherwise an exact loop of per-expert ``mm`` on contiguous row blocks.

Legend: N tokens, H hidden, I expert intermediate size, E experts, S routed rows (N*K), sorted by expert.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GMM_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.bfloat16,)}


def grouped_mm_usable(*tensors: torch.Tensor) -> bool:
    """Whether the grouped GEMM kernel accepts these weights (device, dtype, 16-byte alignment).

    Activations are fresh, contiguous allocations inside the kernel, so checking the expert weights
    (their addresses, strides and last dimensions H and I) covers every operand.
    """
    if _GROUPED_MM is None:
        return False
    first = tensors[0]
    if first.dtype not in _GMM_DTYPES.get(first.device.type, ()):
        return False
    if first.device.type == "cuda" and torch.cuda.get_device_capability(first.device) < (8, 0):
        return False
    for t in tensors:
        size = t.element_size()
        if t.dtype != first.dtype or t.data_ptr() % 16:
            return False
        if any((s * size) % 16 for s, n in zip(t.stride(), t.shape, strict=True) if s != 1 and n > 1):
            return False
        if (t.shape[-1] * size) % 16:
            return False
    return True


def _blocks(counts: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(expert, start, end)`` of each non-empty row block."""
    out, start = [], 0
    for e, c in enumerate(counts):
        if c:
            out.append((e, start, start + c))
        start += c
    return out


def group_linear(
    a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, counts: Sequence[int] | None
) -> torch.Tensor:
    """Rows of expert e times ``w[e]^T``: ``a [S, K]``, ``w [E, M, K]`` -> ``[S, M]``."""
    if counts is None:
        return _GROUPED_MM(a, w.transpose(1, 2), offs=offsets)
    out = a.new_empty(a.shape[0], w.shape[1])
    for e, s0, s1 in _blocks(counts):
        torch.mm(a[s0:s1], w[e].t(), out=out[s0:s1])
    return out


def group_matmul(
    g: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, counts: Sequence[int] | None
) -> torch.Tensor:
    """Rows of expert e times ``w[e]``: ``g [S, M]``, ``w [E, M, K]`` -> ``[S, K]``."""
    if counts is None:
        return _GROUPED_MM(g, w, offs=offsets)
    out = g.new_empty(g.shape[0], w.shape[2])
    for e, s0, s1 in _blocks(counts):
        torch.mm(g[s0:s1], w[e], out=out[s0:s1])
    return out


def group_outer(
    g: torch.Tensor, a: torch.Tensor, offsets: torch.Tensor, counts: Sequence[int] | None, n_experts: int
) -> torch.Tensor:
    """Per-expert ``g_e^T a_e``: ``g [S, M]``, ``a [S, K]`` -> ``[E, M, K]`` (zeros for empty experts)."""
    if counts is None and g.shape[0] > 0:
        return _GROUPED_MM(g.t(), a, offs=offsets)
    out = g.new_zeros(n_experts, g.shape[1], a.shape[1])
    for e, s0, s1 in _blocks(counts or [0] * n_experts):
        torch.mm(g[s0:s1].t(), a[s0:s1], out=out[e])
    return out


def _act_grad(act: str, grad: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> None:
    """Write ``grad * act'(g)`` into ``out``."""
    if act == "silu":
        torch.ops.aten.silu_backward.grad_input(grad, g, grad_input=out)
        return
    with torch.enable_grad():
        leaf = g.detach().requires_grad_()
        (d,) = torch.autograd.grad(ACT2FN[act](leaf), leaf, grad)
    out.copy_(d)


class FusedExperts(torch.autograd.Function):
    """``out[n] = sum over rows s of token n: w_s * down_e(act(gate_e(x_n)) * up_e(x_n))`` in one node."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,  # [N, H]
        gate_up: torch.Tensor,  # [E, 2I, H]
        down: torch.Tensor,  # [E, H, I]
        token: torch.Tensor,  # [S]
        weights: torch.Tensor,  # [S]
        offsets: torch.Tensor,  # [E] int32
        counts: list[int] | None,  # None: grouped_mm; else the per-expert loop
        act: str,
    ) -> torch.Tensor:
        inter = down.shape[-1]
        xs = x.index_select(0, token)  # [S, H]
        h = group_linear(xs, gate_up, offsets, counts)  # [S, 2I]
        del xs
        g, u = h[:, :inter], h[:, inter:]
        aw = ACT2FN[act](g)  # [S, I]
        aw.mul_(u).mul_(weights.to(aw.dtype).unsqueeze(-1))
        y = group_linear(aw, down, offsets, counts)  # [S, H]
        out = x.new_zeros(x.shape).index_add_(0, token, y)  # [N, H]
        ctx.save_for_backward(x, gate_up, down, token, weights, offsets, h, aw)
        ctx.counts, ctx.act = counts, act
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, gate_up, down, token, weights, offsets, h, aw = ctx.saved_tensors
        counts, act = ctx.counts, ctx.act
        need_x, need_gu, need_down, _, need_w = ctx.needs_input_grad[:5]
        n_experts, inter = down.shape[0], down.shape[-1]
        grad_x = grad_gu = grad_down = grad_w = None

        gy = grad_out.contiguous().index_select(0, token)  # [S, H]
        if need_down:
            grad_down = group_outer(gy, aw, offsets, counts, n_experts)  # [E, H, I]
        del aw
        if not (need_x or need_gu or need_w):
            return grad_x, grad_gu, grad_down, None, grad_w, None, None, None
        gaw = group_matmul(gy, down, offsets, counts)  # [S, I] grad of the weighted activation
        del gy
        g, u = h[:, :inter], h[:, inter:]
        act_g = ACT2FN[act](g)  # [S, I]
        a = act_g * u
        if need_w:  # row-wise dot products without an [S, I] temporary
            grad_w = torch.bmm(gaw.unsqueeze(1), a.unsqueeze(2)).view(-1).to(weights.dtype)
        if need_x or need_gu:
            ga = gaw.mul_(weights.to(gaw.dtype).unsqueeze(-1))  # [S, I] grad of act(g) * u
            gh = torch.empty_like(h)  # [S, 2I]
            torch.mul(ga, act_g, out=gh[:, inter:])
            _act_grad(act, torch.mul(ga, u, out=a), g, gh[:, :inter])
            del ga, a, act_g
            if need_gu:
                xs = x.index_select(0, token)  # recomputed rather than kept from forward
                grad_gu = group_outer(gh, xs, offsets, counts, n_experts)  # [E, 2I, H]
                del xs
            if need_x:
                gxs = group_matmul(gh, gate_up, offsets, counts)  # [S, H]
                grad_x = x.new_zeros(x.shape).index_add_(0, token, gxs)
        return grad_x, grad_gu, grad_down, None, grad_w, None, None, None


def fused_experts(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    token: torch.Tensor,
    weights: torch.Tensor,
    counts: torch.Tensor,
    offsets: torch.Tensor,
    act: str = "silu",
    *,
    use_grouped_mm: bool | None = None,
) -> torch.Tensor:
    """Routed experts over sorted rows, combined per token: ``x [N, H] -> [N, H]``.

    Args:
        x: ``[N, H]`` token activations.
        gate_up: ``[E, 2I, H]`` fused gate (rows ``[0, I)``) and up (rows ``[I, 2I)``) projections.
        down: ``[E, H, I]`` down projections.
        token: ``[S]`` source token of each row, rows sorted by expert.
        weights: ``[S]`` combine weight of each row.
        counts: ``[E]`` rows per expert; offsets: ``[E]`` int32 cumulative counts.
        act: activation name (``transformers.activations.ACT2FN``) of the gate.
        use_grouped_mm: force the grouped GEMM (True) or the per-expert loop (False); default: grouped GEMM
            whenever :func:`grouped_mm_usable` allows it.
    """
    wdtype = gate_up.dtype
    x_in = x if x.dtype == wdtype else x.to(wdtype)
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_usable(gate_up, down)
    host_counts = None if use_grouped_mm else counts.tolist()
    out = FusedExperts.apply(x_in, gate_up, down, token, weights, offsets, host_counts, act)
    return out if out.dtype == x.dtype else out.to(x.dtype)
