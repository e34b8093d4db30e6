"""Fast routed-experts kernel: gather -> grouped GEMM -> gated activation -> grouped GEMM -> weighted scatter.

One autograd node does the ``experts`` and ``combine`` stages for all experts at once, on rows already
sorted by expert (:func:`myllm.blocks.ffn.moe.dispatch.dispatch`). Compared with composing the same steps
from autograd ops it keeps fewer intermediates (the gathered input is recomputed in backward; only the
up-projection output ``h [S, 2I]`` and the weighted activation ``[S, I]`` are saved) and folds the routing
weight into the activation before the down projection (``[S, I]`` instead of ``[S, H]`` work). The weight
gradients are always full ``[E, ...]`` tensors (zeros for experts that got no rows), so every expert
parameter takes part in every backward: ranks of a ZeRO-3 job never disagree on which parameters
produced gradients.

Two matrix-product backends, same results (tests compare both with the plain reference):

- grouped GEMM (``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``) over all rows at once; the
  default off CPU when device, dtype and 16-byte alignment allow (:func:`grouped_mm_usable`);
- a per-expert ``mm`` loop writing into preallocated outputs, over chunks of whole experts of at most
  :data:`CHUNK_BYTES` per temporary: the default on CPU (where grouped_mm is itself a loop of ``mm``) and
  the fallback for unaligned sizes. Small chunks matter on CPU: large temporaries are freshly mapped (and
  page-faulted) by the C allocator on every call, chunk-sized ones are recycled.

Legend: N tokens, H hidden, I expert intermediate size, E experts, S routed rows (N*K), sorted by expert;
n rows of one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
CHUNK_BYTES = 8 << 20  # largest per-chunk temporary of the CPU path
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


@dataclass(frozen=True)
class Chunk:
    """A run of consecutive experts ``[e0, e1)`` and their sorted rows ``[r0, r1)``.

    ``counts`` (rows per expert of the chunk, on the host) selects the per-expert ``mm`` loop; ``None``
    selects one grouped GEMM over all experts with the device ``offsets``.
    """

    e0: int
    e1: int
    r0: int
    r1: int
    counts: tuple[int, ...] | None = None
    offsets: torch.Tensor | None = None

    def blocks(self) -> list[tuple[int, int, int]]:
        """``(expert, start, end)`` of each non-empty row block, rows relative to the chunk."""
        out, start = [], 0
        for e, c in enumerate(self.counts or (), start=self.e0):
            if c:
                out.append((e, start, start + c))
            start += c
        return out


def plan_chunks(counts: list[int] | None, offsets: torch.Tensor, n_rows: int, max_rows: int) -> list[Chunk]:
    """Split the sorted rows into chunks of whole experts with at most ``max_rows`` rows (or one expert).

    Chunking keeps every temporary small, so the CPU allocator recycles it instead of mapping (and
    page-faulting) fresh memory on every call. ``counts=None`` (grouped GEMM): a single chunk.
    """
    if counts is None:
        return [Chunk(0, offsets.shape[0], 0, n_rows, None, offsets)]
    chunks, e0, r0, rows = [], 0, 0, 0
    for e, c in enumerate(counts):
        if rows and rows + c > max_rows:
            chunks.append(Chunk(e0, e, r0, r0 + rows, tuple(counts[e0:e])))
            e0, r0, rows = e, r0 + rows, 0
        rows += c
    chunks.append(Chunk(e0, len(counts), r0, r0 + rows, tuple(counts[e0:])))
    return chunks


def group_linear(chunk: Chunk, a: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of expert e times ``w[e]^T``: ``a [n, K]``, ``w [E, M, K]`` -> ``[n, M]``."""
    if chunk.counts is None:
        return _GROUPED_MM(a, w.transpose(1, 2), offs=chunk.offsets)
    out = a.new_empty(a.shape[0], w.shape[1]) if out is None else out
    for e, s0, s1 in chunk.blocks():
        torch.mm(a[s0:s1], w[e].t(), out=out[s0:s1])
    return out


def group_matmul(chunk: Chunk, g: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of expert e times ``w[e]``: ``g [n, M]``, ``w [E, M, K]`` -> ``[n, K]``."""
    if chunk.counts is None:
        return _GROUPED_MM(g, w, offs=chunk.offsets)
    out = g.new_empty(g.shape[0], w.shape[2]) if out is None else out
    for e, s0, s1 in chunk.blocks():
        torch.mm(g[s0:s1], w[e], out=out[s0:s1])
    return out


def group_outer(chunk: Chunk, g: torch.Tensor, a: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per-expert ``g_e^T a_e`` (``g [n, M]``, ``a [n, K]``) written into ``grad[e]`` of ``grad [E, M, K]``.

    Experts of the chunk without rows get zeros. Returns ``grad`` (a new tensor for the grouped GEMM).
    """
    if chunk.counts is None:
        if g.shape[0] == 0:
            return grad.zero_()
        return _GROUPED_MM(g.t(), a, offs=chunk.offsets)
    for e, c in enumerate(chunk.counts, start=chunk.e0):
        if not c:
            grad[e].zero_()
    for e, s0, s1 in chunk.blocks():
        torch.mm(g[s0:s1].t(), a[s0:s1], out=grad[e])
    return grad


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
        chunks: list[Chunk],
        act: str,
    ) -> torch.Tensor:
        inter = down.shape[-1]
        out = x.new_zeros(x.shape)  # [N, H]
        saved = []
        for c in chunks:
            tok = token[c.r0 : c.r1]
            xs = x.index_select(0, tok)  # [n, H]
            h = group_linear(c, xs, gate_up)  # [n, 2I]
            aw = ACT2FN[act](h[:, :inter])  # [n, I]
            aw.mul_(h[:, inter:]).mul_(weights[c.r0 : c.r1].to(aw.dtype).unsqueeze(-1))
            y = group_linear(c, aw, down, out=xs if c.counts is not None else None)  # [n, H]
            out.index_add_(0, tok, y)
            saved += [h, aw]
        ctx.save_for_backward(x, gate_up, down, token, weights, *saved)
        ctx.chunks, ctx.act = chunks, act
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, gate_up, down, token, weights, *saved = ctx.saved_tensors
        chunks, act = ctx.chunks, ctx.act
        need_x, need_gu, need_down, _, need_w = ctx.needs_input_grad[:5]
        inter = down.shape[-1]
        grad_out = grad_out.contiguous()
        grad_x = x.new_zeros(x.shape) if need_x else None
        grad_gu = torch.empty_like(gate_up) if need_gu else None
        grad_down = torch.empty_like(down) if need_down else None
        grad_w = weights.new_empty(weights.shape) if need_w else None
        need_h = need_x or need_gu or need_w
        for c, h, aw in zip(chunks, saved[0::2], saved[1::2], strict=True):
            tok = token[c.r0 : c.r1]
            gy = grad_out.index_select(0, tok)  # [n, H]
            if need_down:
                grad_down = group_outer(c, gy, aw, grad_down)  # [E, H, I]
            if not need_h:
                continue
            gaw = group_matmul(c, gy, down)  # [n, I] grad of the weighted activation
            g, u = h[:, :inter], h[:, inter:]
            act_g = ACT2FN[act](g)  # [n, I]
            a = act_g * u
            if need_w:  # row-wise dot products without an [n, I] temporary
                grad_w[c.r0 : c.r1] = torch.bmm(gaw.unsqueeze(1), a.unsqueeze(2)).view(-1)
            if not (need_x or need_gu):
                continue
            ga = gaw.mul_(weights[c.r0 : c.r1].to(gaw.dtype).unsqueeze(-1))  # [n, I] grad of act(g) * u
            gh = torch.empty_like(h)  # [n, 2I]
            torch.mul(ga, act_g, out=gh[:, inter:])
            _act_grad(act, torch.mul(ga, u, out=a), g, gh[:, :inter])
            if need_gu:
                xs = torch.index_select(x, 0, tok, out=gy)  # recomputed rather than kept from forward
                grad_gu = group_outer(c, gh, xs, grad_gu)  # [E, 2I, H]
            if need_x:
                gxs = group_matmul(c, gh, gate_up, out=gy if c.counts is not None else None)  # [n, H]
                grad_x.index_add_(0, tok, gxs)
        return grad_x, grad_gu, grad_down, None, grad_w, None, None


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
        use_grouped_mm: force the grouped GEMM (True) or the chunked per-expert loop (False); default: the
            grouped GEMM off CPU whenever :func:`grouped_mm_usable` allows it, else the loop.
    """
    wdtype = gate_up.dtype
    x_in = x if x.dtype == wdtype else x.to(wdtype)
    if use_grouped_mm is None:
        use_grouped_mm = x.device.type != "cpu" and grouped_mm_usable(gate_up, down)
    max_rows = max(1, CHUNK_BYTES // (max(gate_up.shape[1], gate_up.shape[2]) * gate_up.element_size()))
    chunks = plan_chunks(None if use_grouped_mm else counts.tolist(), offsets, token.shape[0], max_rows)
    out = FusedExperts.apply(x_in, gate_up, down, token, weights.to(wdtype), chunks, act)
    return out if out.dtype == x.dtype else out.to(x.dtype)
