"""Converting trained MHA/GQA attention to multi-head latent attention (MLA), as pure weight transforms.

Legend: H query heads, Hk key/value heads (G = H // Hk), d head dim, n = ``rope_dims // 2`` rotary pairs
kept per kv head, dn = d - 2n, r = ``kv_lora_rank``, X calibration inputs ``[N, hidden]``.

The result is an :class:`~myllm.blocks.attention.mla.MLAttention` block (see its docstring for the
extensions used here) that caches ``r + Hk * 2n`` elements per token (``+ Hk`` key-norm scales for Qwen3)
instead of ``2 * Hk * d``:

1. **Partial RoPE (MHA2MLA, arXiv 2502.14837, 2-norm selection).** Per kv head the ``n`` rotary pairs
   ``(i, i + d/2)`` with the largest ``||q_pair|| * ||k_pair||`` (summed over the query heads of the group) keep
   RoPE; the scores come from calibration activations when given, else from the projection weights. The kept
   key dims become the kv head's RoPE key (``num_rope_heads = Hk``, ``rope_pairs`` = the kept frequencies of
   the original table, so the block rotates them exactly as before); the other pairs lose RoPE. With Qwen3's
   shared q/k norm weights one selection is used for all heads (the norm weights must stay shared).
2. **Joint K/V factorisation (SVD_joint / TransMLA-style PCA).** The rows ``[W_k_nope; W_v]`` of every kv
   head (with the k/v biases as an extra input column) are factorised at rank ``r`` into the down-projection
   (the latent rows of ``kv_a_proj_with_mqa``, biases included) and ``kv_b_proj``. With calibration inputs the
   factorisation minimises the error of the K/V *outputs* on them (SVD of ``M @ chol(X^T X)``); key rows are
   first rescaled so that K and V weigh equally (TransMLA's BKV), which does not change the function.
3. **Everything else is kept**: queries (bias included) are the original rows in the block's ``[nope | rope]``
   order, the q/k norm weights are permuted the same way, ``o_proj`` and the softmax scale are unchanged,
   and there is no latent RMSNorm (it is non-linear).

At full rank (``r`` = the rank bound of the K/V rows) with every RoPE dim kept the block computes exactly
the original attention (tests: logits <= 1e-4). Lower ranks and fewer RoPE dims trade quality for cache; the
MLA papers heal that with a short finetune.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from myllm.blocks.attention.mla import MLAConfig, MLAttention
from myllm.surgery.attention import AttentionSpec, read_attention


@dataclass
class MLAConversion:
    """What :func:`gqa_to_mla` produces: the block's state dict and keyword arguments, and the cache sizes."""

    state_dict: dict[str, torch.Tensor]
    block_kwargs: dict[str, Any]
    rope_pairs: list[list[int]]
    kv_bytes_before: int  # per token and layer, in the weights' dtype
    kv_bytes_after: int


def kv_full_rank(spec: AttentionSpec, rope_dims: int) -> int:
    """The largest useful ``kv_lora_rank``: the rank bound of the joint ``[W_k_nope; W_v]`` rows."""
    rows = spec.num_kv_heads * (2 * spec.head_dim - rope_dims)
    return min(rows, spec.hidden_size + int(spec.k_bias or spec.v_bias))


def check_mla_settings(spec: AttentionSpec, *, kv_lora_rank: int, rope_dims: int) -> None:
    """Raise ``ValueError`` for settings :func:`gqa_to_mla` cannot honour (nothing is changed before this)."""
    if not isinstance(rope_dims, int) or rope_dims < 0 or rope_dims % 2 or rope_dims > spec.head_dim:
        raise ValueError(
            f"rope_dims must be an even number of dims per head in [0, head_dim={spec.head_dim}] (RoPE rotates "
            f"pairs), got {rope_dims!r}"
        )
    full = kv_full_rank(spec, rope_dims)
    if not isinstance(kv_lora_rank, int) or not 1 <= kv_lora_rank <= full:
        raise ValueError(
            f"kv_lora_rank must be in [1, {full}] (the full rank of the joint K/V rows for rope_dims={rope_dims}), "
            f"got {kv_lora_rank!r}"
        )
    if spec.sliding_window is not None:
        raise ValueError("sliding-window attention cannot be converted to MLA (the MLA block has no window)")


def _heads(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a projection ``[n_heads * d, ...]`` -> ``[n_heads, d, ...]``."""
    return w.reshape(n_heads, -1, *w.shape[1:])


def _pair_norms(rows: torch.Tensor, x: torch.Tensor | None, norm: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Importance of each rotary pair of each head: ``rows [heads, d, hidden+1]`` -> ``[heads, d/2]``.

    With calibration inputs ``x [N, hidden+1]`` the mean 2-norm of the pair's activations (after the per-head
    norm, if any), else the Frobenius norm of the pair's weight rows (times the norm weights).
    """
    half = rows.shape[1] // 2
    if x is None:
        w = rows if norm is None else rows * norm[None, :, None]
        per_dim = w.pow(2).sum(-1)  # (heads, d)
        return (per_dim[:, :half] + per_dim[:, half:]).sqrt()
    act = torch.einsum("hdi,ni->nhd", rows, x)  # (N, heads, d)
    if norm is not None:
        act = act * torch.rsqrt(act.pow(2).mean(-1, keepdim=True) + eps) * norm
    return (act[..., :half].pow(2) + act[..., half:].pow(2)).sqrt().mean(0)


def select_rope_pairs(
    spec: AttentionSpec,
    q_rows: torch.Tensor,
    k_rows: torch.Tensor,
    n_keep: int,
    *,
    calibration: torch.Tensor | None = None,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    shared: bool = False,
) -> list[list[int]]:
    """MHA2MLA's 2-norm selection: the ``n_keep`` pairs per kv head with the largest ``||q|| * ||k||``.

    ``q_rows [H, d, hidden+1]``, ``k_rows [Hk, d, hidden+1]`` (bias as the last input column); ``calibration``
    ``[N, hidden+1]``. Query scores are summed over the heads of a group; ``shared`` sums over all kv heads
    and returns one selection for every head. Returns sorted pair indices per kv head.
    """
    q_score = _pair_norms(q_rows, calibration, q_norm, spec.norm_eps)  # (H, d/2)
    k_score = _pair_norms(k_rows, calibration, k_norm, spec.norm_eps)  # (Hk, d/2)
    score = q_score.view(spec.num_kv_heads, -1, q_score.shape[-1]).sum(1) * k_score  # (Hk, d/2)
    if shared:
        score = score.sum(0, keepdim=True).expand_as(score)
    picked = score.topk(n_keep, dim=-1).indices.sort(-1).values
    return picked.tolist()


def _kv_factors(
    m: torch.Tensor, rank: int, n_key_rows: torch.Tensor, calibration: torch.Tensor | None, balance_kv: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors ``A [rows, rank]``, ``B [rank, inputs]`` of ``m [rows, inputs]`` (float64).

    Minimises ``||(m - A B) L||_F`` with ``L L^T`` the damped Gram of the calibration inputs (identity
    without), after weighting key rows (``n_key_rows`` marks them) so that K and V weigh equally.
    """
    if calibration is None:
        chol = torch.eye(m.shape[1], dtype=m.dtype)
    else:
        gram = calibration.T @ calibration / calibration.shape[0]
        gram = gram + 1e-6 * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype)
        chol = torch.linalg.cholesky(gram)
    weight = torch.ones(m.shape[0], dtype=m.dtype)
    if balance_kv and bool(n_key_rows.any()) and not bool(n_key_rows.all()):
        k_energy = (m[n_key_rows] @ chol).norm()
        v_energy = (m[~n_key_rows] @ chol).norm()
        if k_energy > 0 and v_energy > 0:
            weight[n_key_rows] = v_energy / k_energy
    weighted = weight[:, None] * m
    u = torch.linalg.svd(weighted @ chol, full_matrices=False)[0][:, :rank]
    b = u.T @ weighted  # (rank, inputs)
    scale = b.norm(dim=1).clamp_min(1e-12).sqrt()  # balance the two factors' magnitudes
    return (u * scale) / weight[:, None], b / scale[:, None]


def gqa_to_mla(
    state_dict: Mapping[str, torch.Tensor],
    spec: AttentionSpec,
    *,
    kv_lora_rank: int,
    rope_dims: int,
    calibration: torch.Tensor | None = None,
    balance_kv: bool = True,
) -> MLAConversion:
    """Factorise one attention layer into MLA (see the module docstring).

    Args:
        state_dict: the attention module's weights (``q_proj``/``k_proj``/``v_proj``/``o_proj``, biases,
            ``q_norm``/``k_norm``), as returned by ``module.state_dict()``.
        spec: its sizes (:func:`myllm.surgery.attention.read_attention`).
        kv_lora_rank: latent width ``r``, in ``[1, kv_full_rank(spec, rope_dims)]``.
        rope_dims: dims per kv head that keep RoPE (even, ``<= head_dim``); ``head_dim`` keeps all.
        calibration: inputs of this attention ``[N, hidden]`` (e.g. from :func:`collect_attention_inputs`) to
            guide the pair selection and the factorisation; ``None`` uses the weights alone.
        balance_kv: weigh K and V rows equally in the factorisation.

    Raises:
        ValueError: bad ``kv_lora_rank``/``rope_dims``, a sliding window, or calibration of the wrong width.
    """
    check_mla_settings(spec, kv_lora_rank=kv_lora_rank, rope_dims=rope_dims)
    hidden, d, n_heads, n_kv = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads
    if calibration is not None and (calibration.dim() != 2 or calibration.shape[1] != hidden):
        raise ValueError(f"calibration must be [N, {hidden}] inputs of the attention, got {tuple(calibration.shape)}")
    dtype = state_dict["q_proj.weight"].dtype

    def rows(name: str, n: int, has_bias: bool) -> torch.Tensor:  # [n, d, hidden + 1], bias as the last column
        w = state_dict[f"{name}.weight"].double()
        b = state_dict[f"{name}.bias"].double() if has_bias else torch.zeros(w.shape[0], dtype=w.dtype)
        return _heads(torch.cat([w, b[:, None]], dim=1), n)

    q, k, v = (
        rows("q_proj", n_heads, spec.q_bias),
        rows("k_proj", n_kv, spec.k_bias),
        rows("v_proj", n_kv, spec.v_bias),
    )
    x = (
        None
        if calibration is None
        else torch.cat([calibration.double(), calibration.new_ones(len(calibration), 1).double()], 1)
    )
    q_norm = state_dict["q_norm.weight"].double() if spec.qk_norm else None
    k_norm = state_dict["k_norm.weight"].double() if spec.qk_norm else None
    n_keep = rope_dims // 2
    pairs = select_rope_pairs(spec, q, k, n_keep, calibration=x, q_norm=q_norm, k_norm=k_norm, shared=spec.qk_norm)
    half = d // 2
    perms = []  # per kv head: original dims in the block's [nope | rope] order
    for kept in pairs:
        rope = [*kept, *(p + half for p in kept)]
        nope = [i for i in range(d) if i not in set(rope)]
        perms.append(torch.tensor(nope + rope))
    group = n_heads // n_kv
    q_perm = torch.stack([q[h, perms[h // group]] for h in range(n_heads)])  # (H, d, hidden+1)
    k_perm = torch.stack([k[g, perms[g]] for g in range(n_kv)])  # (Hk, d, hidden+1)
    dn = d - rope_dims

    # joint K/V rows per kv head: [k_nope (dn) | v (d)], the layout of kv_b_proj
    m = torch.cat([k_perm[:, :dn], v], dim=1).reshape(-1, hidden + 1)
    key_rows = torch.cat([torch.ones(n_kv, dn, dtype=torch.bool), torch.zeros(n_kv, d, dtype=torch.bool)], 1).flatten()
    kv_bias = spec.k_bias or spec.v_bias
    if not kv_bias:
        m = m[:, :hidden]
    a, b = _kv_factors(m, kv_lora_rank, key_rows, None if x is None else (x if kv_bias else x[:, :hidden]), balance_kv)
    if not kv_bias:
        b = torch.cat([b, torch.zeros(kv_lora_rank, 1, dtype=b.dtype)], 1)
    k_rope = k_perm[:, dn:].reshape(-1, hidden + 1)  # (Hk * 2n, hidden + 1)
    kv_a = torch.cat([b, k_rope], dim=0)

    attention_bias = kv_bias or spec.o_bias
    out: dict[str, torch.Tensor] = {
        "q_proj.weight": q_perm[..., :hidden].reshape(-1, hidden),
        "kv_a_proj_with_mqa.weight": kv_a[:, :hidden],
        "kv_b_proj.weight": a,
        "o_proj.weight": state_dict["o_proj.weight"],
    }
    if spec.q_bias:
        out["q_proj.bias"] = q_perm[..., hidden].reshape(-1)
    if attention_bias:
        out["kv_a_proj_with_mqa.bias"] = kv_a[:, hidden]
        out["o_proj.bias"] = state_dict["o_proj.bias"] if spec.o_bias else torch.zeros(hidden)
    if spec.qk_norm:
        out["q_norm.weight"] = q_norm[perms[0]]
        out["k_norm.weight"] = k_norm[perms[0]]
    out = {name: t.to(dtype).contiguous() for name, t in out.items()}

    block_kwargs = {
        "hidden_size": hidden,
        "num_heads": n_heads,
        "num_kv_heads": n_kv,
        "num_rope_heads": n_kv,
        "kv_lora_rank": kv_lora_rank,
        "qk_nope_head_dim": dn,
        "qk_rope_head_dim": rope_dims,
        "v_head_dim": d,
        "rope_interleave": False,
        "rope_pairs": pairs,
        "rope_table_dim": d,
        "latent_norm": False,
        "attention_bias": attention_bias,
        "q_bias": spec.q_bias,
        "qk_norm": spec.qk_norm,
        "norm_eps": spec.norm_eps,
        "dropout": spec.dropout,
        "scaling": spec.scaling,
        "layer_idx": spec.layer_idx,
        "rope_parameters": spec.rope_parameters,
        "max_position_embeddings": spec.max_position_embeddings,
    }
    size = torch.empty((), dtype=dtype).element_size()
    after = kv_lora_rank + n_kv * rope_dims + (n_kv if spec.qk_norm else 0)
    return MLAConversion(out, block_kwargs, pairs, 2 * n_kv * d * size, after * size)


def to_mla(
    module: nn.Module,
    *,
    kv_lora_rank: int,
    rope_dims: int,
    calibration: torch.Tensor | None = None,
    balance_kv: bool = True,
) -> MLAttention:
    """An :class:`MLAttention` converted from ``module`` (on its device and dtype); ``module`` is not changed.

    Raises:
        TypeError: ``module`` is not an attention the converter understands (see ``read_attention``).
        ValueError: bad settings (see :func:`gqa_to_mla`).
    """
    spec = read_attention(module)
    check_mla_settings(spec, kv_lora_rank=kv_lora_rank, rope_dims=rope_dims)
    state = {k: t.detach().cpu() for k, t in module.state_dict().items()}
    conversion = gqa_to_mla(
        state, spec, kv_lora_rank=kv_lora_rank, rope_dims=rope_dims, calibration=calibration, balance_kv=balance_kv
    )
    config = MLAConfig(**conversion.block_kwargs)
    param = next(module.parameters())
    block = MLAttention(**dict(config)).to(device=param.device, dtype=param.dtype)
    block.load_state_dict(conversion.state_dict, strict=True)
    return block.train(module.training)


def kv_cache_bytes_per_token(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    """KV-cache bytes one token costs in this attention layer (``dtype``: default the module's).

    MLA blocks report their latent cache (``cache_elements_per_token``); q/k/v/o attention caches
    ``2 * Hk * head_dim``.
    """
    dtype = dtype or next(module.parameters()).dtype
    size = torch.empty((), dtype=dtype).element_size()
    per_token = getattr(module, "cache_elements_per_token", None)
    if callable(per_token):
        return per_token() * size
    spec = read_attention(module)
    return 2 * spec.num_kv_heads * spec.head_dim * size


def collect_attention_inputs(
    model: nn.Module,
    modules: list[nn.Module],
    batches: list[dict[str, torch.Tensor]],
    *,
    max_tokens: int = 4096,
) -> list[torch.Tensor]:
    """Calibration inputs ``[N, hidden]`` of each attention module, from running ``model`` on ``batches``.

    ``batches`` are keyword dicts for ``model(**batch)``; positions where ``batch["attention_mask"]`` is 0 are
    dropped. At most ``max_tokens`` rows are kept per module. The model is run without grad and left as is.
    """
    captured: list[list[torch.Tensor]] = [[] for _ in modules]
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(index: int):
        def grab(mod, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            rows = hidden.detach().reshape(-1, hidden.shape[-1])
            if current["mask"] is not None:
                rows = rows[current["mask"].reshape(-1).bool()]
            captured[index].append(rows.float().cpu())

        return grab

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch.get("attention_mask")
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(rows)[:max_tokens] for rows in captured]
