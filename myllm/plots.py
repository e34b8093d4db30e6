"""PNG plots of runs: loss curves, expert load per layer, perplexity comparisons (``myllm plot RUN_DIR``).

matplotlib is an optional extra (``pip install 'myllm[plot]'``), imported when a plot is drawn; a missing
matplotlib raises :class:`PlotDependencyError` saying how to install it. Figures are drawn with matplotlib's
object API on the Agg canvas (no ``pyplot``, no global backend switch) and written atomically.

Files a run directory may hold, and what :func:`plot_run` draws from them:

* ``metrics.jsonl`` (the training loop's records, ``{"step", "loss", ...}`` per line), in the directory or
  anywhere below it (one curve each, labelled by its folder) -> ``loss.png``;
* ``expert_load.json``: ``{panel title: myllm.blocks.ffn.moe.expert_load(model)}`` -> ``expert_load.png``;
* ``ppl.json``: ``{model label: myllm.eval.perplexity(...) result}`` -> ``ppl.png``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from myllm.data.io import atomic_path, ensure_writable_dir, read_json

METRICS_FILE = "metrics.jsonl"
EXPERT_LOAD_FILE = "expert_load.json"
PPL_FILE = "ppl.json"


class PlotDependencyError(ImportError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise :class:`PlotDependencyError` (with the install command) when matplotlib is missing."""
    _figure()


def _figure(**kwargs: Any) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotDependencyError(
            "plots need matplotlib, an optional extra: pip install 'myllm[plot]' (or pip install matplotlib)"
        ) from exc
    return Figure(**kwargs)


def _save(fig: Any, path: str | os.PathLike) -> Path:
    out = Path(path)
    ensure_writable_dir(out.parent)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return out


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file; a cut last line (a run killed mid-write) is skipped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed line other than the last, or a record that is not an object.
    """
    p = Path(path)
    lines = p.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            if i == len(lines):
                break
            raise ValueError(f"{p}:{i}: invalid JSON in a metrics file ({exc})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{p}:{i}: a metrics record is a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def ema(values: Sequence[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing); ``beta = 0`` returns the values."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def plot_loss_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]] | str | os.PathLike],
    path: str | os.PathLike,
    *,
    key: str = "loss",
    x: str = "step",
    smooth: float = 0.8,
    title: str = "training loss",
) -> Path:
    """Write :func:`loss_figure` to the PNG ``path``."""
    return _save(loss_figure(runs, key=key, x=x, smooth=smooth, title=title), path)


def loss_figure(
    runs: Mapping[str, Sequence[Mapping[str, Any]] | str | os.PathLike],
    *,
    key: str = "loss",
    x: str = "step",
    smooth: float = 0.8,
    title: str = "training loss",
) -> Any:
    """One line per run: ``key`` against ``x`` (faint raw values and an EMA-smoothed line).

    Args:
        runs: label -> records, or label -> metrics JSONL path.
        smooth: EMA factor in ``[0, 1)`` for the bold line.

    Raises:
        ValueError: no run has any ``key`` value; a bad ``smooth``.
    """
    if not 0 <= smooth < 1:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}")
    series = {}
    for label, recs in runs.items():
        recs = read_metrics(recs) if isinstance(recs, (str, os.PathLike)) else recs
        pts = [(r[x], r[key]) for r in recs if _finite(r.get(key)) and _finite(r.get(x))]
        if pts:
            series[label] = pts
    if not series:
        raise ValueError(f"no run has {key!r} values against {x!r} to plot (runs: {', '.join(runs) or 'none'})")
    fig = _figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    colors = _colors(len(series))
    for (label, pts), color in zip(series.items(), colors, strict=True):
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, ema(ys, smooth), color=color, linewidth=2, label=label)
    ax.set_xlabel(x)
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_expert_load(loads: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str | os.PathLike) -> Path:
    """Write :func:`expert_load_figure` to the PNG ``path``."""
    return _save(expert_load_figure(loads), path)


def expert_load_figure(loads: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> Any:
    """Heatmaps of the share of routed tokens per expert (columns) and MoE layer (rows), one panel per entry.

    Args:
        loads: panel title -> :func:`myllm.blocks.ffn.moe.expert_load` result (layer name ->
            ``{"tokens_per_expert": [...], "max_vio": ...}``). Row labels show the layer index and MaxVio.

    Raises:
        ValueError: no panel, a panel without layers, or layers with different expert counts within a panel.
    """
    if not loads or any(not layers for layers in loads.values()):
        raise ValueError("expert load plot: need at least one panel, each with at least one MoE layer")
    shares = {title: _shares(title, layers) for title, layers in loads.items()}
    vmax = max(max(float(a.max()) for a in shares.values()), 1e-9)  # one colour scale for every panel
    n_rows = max(len(v) for v in loads.values())
    fig = _figure(figsize=(5.2 * len(loads) + 1, 0.45 * n_rows + 1.8), layout="constrained")
    axes = fig.subplots(1, len(loads), squeeze=False)[0]
    image = None
    for ax, (title, layers) in zip(axes, loads.items(), strict=True):
        share = shares[title]
        image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        n_exp = share.shape[1]
        ax.set_xticks(range(n_exp))
        ax.set_xlabel("expert")
        ax.set_yticks(range(share.shape[0]))
        ax.set_yticklabels([_layer_label(name) for name in layers])
        right = ax.secondary_yaxis("right")
        right.set_yticks(range(share.shape[0]))
        right.set_yticklabels([f"MaxVio {e.get('max_vio', math.nan):.2f}" for e in layers.values()])
        ax.set_title(title)
        if n_exp <= 16:
            for i in range(share.shape[0]):
                for j in range(n_exp):
                    color = "black" if share[i, j] > 0.6 * vmax else "white"
                    ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=list(axes), label="share of routed tokens", shrink=0.9)
    return fig


def plot_perplexity_bars(
    results: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    metrics: Sequence[str] = ("ppl", "bits_per_byte"),
    title: str = "held-out evaluation",
) -> Path:
    """Write :func:`perplexity_figure` to the PNG ``path``."""
    return _save(perplexity_figure(results, metrics=metrics, title=title), path)


def _shares(title: str, layers: Mapping[str, Mapping[str, Any]]) -> Any:
    """``[layers, experts]`` share of each layer's routed tokens per expert (rows sum to 1; empty rows 0)."""
    import numpy as np

    try:
        counts = [[float(c) for c in entry["tokens_per_expert"]] for entry in layers.values()]
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"expert load plot {title!r}: every layer needs a 'tokens_per_expert' list of numbers "
            "(the format of myllm.blocks.ffn.moe.expert_load)"
        ) from None
    if len({len(c) for c in counts}) != 1:
        raise ValueError(f"expert load plot {title!r}: layers have different numbers of experts")
    share = np.array(counts, dtype=float)
    return share / np.maximum(share.sum(axis=1, keepdims=True), 1)


def perplexity_figure(
    results: Mapping[str, Mapping[str, Any]],
    *,
    metrics: Sequence[str] = ("ppl", "bits_per_byte"),
    title: str = "held-out evaluation",
) -> Any:
    """Bars per model, one panel per metric (token perplexity, bits-per-byte ...), values written on the bars.

    Raises:
        ValueError: no results, or a result without one of ``metrics``.
    """
    if not results:
        raise ValueError("perplexity plot: no results")
    missing = [f"{label}:{m}" for label, r in results.items() for m in metrics if not _finite(r.get(m))]
    if missing:
        raise ValueError(f"perplexity plot: missing or non-finite values: {', '.join(missing)}")
    fig = _figure(figsize=(3.6 * len(metrics) + 0.6, 3.8))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    labels = list(results)
    colors = _colors(len(labels))
    for ax, metric in zip(axes, metrics, strict=True):
        values = [float(results[label][metric]) for label in labels]
        bars = ax.bar(range(len(labels)), values, color=colors)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], padding=2)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=15)
        ax.set_title(metric)
        ax.set_ylim(0, max(values) * 1.18)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return fig


def find_metrics(run_dir: str | os.PathLike) -> dict[str, Path]:
    """``label -> metrics file`` of every ``metrics.jsonl`` under a run directory (hidden directories skipped);
    the label is the file's folder relative to ``run_dir`` (the run directory's own name for its own file)."""
    root = Path(run_dir)
    found = {}
    for path in sorted(root.rglob(METRICS_FILE)):
        rel = path.parent.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        found[str(rel) if rel.parts else (root.name or str(root))] = path
    return found


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, key: str = "loss") -> list[Path]:
    """Draw every plot the run directory has data for (see the module docstring) into ``out_dir`` (default: it).

    ``key``: the metric drawn as loss curves (``loss``; ``ce`` for the cross-entropy without MoE balancing terms).

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory.
        ValueError: nothing to plot, malformed inputs, an unwritable ``out_dir`` (checked before drawing).
        PlotDependencyError: matplotlib is missing.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory not found: {root}")
    out = ensure_writable_dir(out_dir if out_dir is not None else root)
    metrics = find_metrics(root)
    load_file, ppl_file = root / EXPERT_LOAD_FILE, root / PPL_FILE
    if not metrics and not load_file.is_file() and not ppl_file.is_file():
        raise ValueError(
            f"nothing to plot in {root}: no {METRICS_FILE} (here or in sub-directories), {EXPERT_LOAD_FILE} or "
            f"{PPL_FILE}"
        )
    require_matplotlib()
    # every figure is built before any file is written: bad input leaves no partial set of plots behind
    figures = {}
    if metrics:
        figures["loss.png"] = loss_figure(metrics, key=key, title=f"training {key} ({root.name})")
    if load_file.is_file():
        figures["expert_load.png"] = expert_load_figure(read_json(load_file, "expert load file"))
    if ppl_file.is_file():
        figures["ppl.png"] = perplexity_figure(read_json(ppl_file, "perplexity results file"))
    return [_save(fig, out / name) for name, fig in figures.items()]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _colors(n: int) -> list[str]:
    base = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    return [base[i % len(base)] for i in range(n)]


def _layer_label(name: str) -> str:
    """``model.layers.3.mlp`` -> ``layer 3`` (other names as they are)."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit():
            return f"layer {parts[i + 1]}"
    return name
