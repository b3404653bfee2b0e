"""Figures in the style of the LoRA paper (Hu et al. 2021): Figures 3, 4, 6-7 and 8.

Every plot function takes grids or curves (tensors, arrays or lists), writes ``<path>.png``
and ``<path>.pdf`` (the suffix of `path` is ignored) and a CSV of every grid or curve next to
them, and returns the paths written. Heatmaps put i (rows, the first matrix) on the y axis
from the top and j on the x axis, with 1-based tick labels, one shared 0..1 colour scale
(sequential, 1 = bright) and one colourbar. Files are written to a temporary name and then
renamed, so a crash never leaves a half-written figure. Uses matplotlib's object API (no
pyplot): no global state, no backend to select, figures are freed when they go out of scope.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from lora_repro.errors import UserError

CMAP = "magma"  # sequential, dark = 0, bright = 1, readable in greyscale
DPI = 200
STYLE = {
    "savefig.dpi": DPI,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 7.5,
    "ytick.labelsize": 7.5,
    "legend.fontsize": 8,
    "pdf.fonttype": 42,  # TrueType: text stays text in the PDF
}
PANEL_HEIGHT = 2.4  # inches


# ---------------------------------------------------------------- files


def _array(grid) -> np.ndarray:
    """A 2-D float64 array from a tensor (any device), array or nested list."""
    if hasattr(grid, "detach"):
        grid = grid.detach().cpu().double().numpy()
    return np.asarray(grid, dtype=np.float64)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temporary file beside `path`, then rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _slug(text: str) -> str:
    """A file-name-safe version of a panel title: "ΔWq, layer 1" -> "dWq_layer_1"."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text.replace("Δ", "d")).strip("_")


def write_grid_csv(grid, path: str | Path, row: str = "i", col: str = "j") -> Path:
    """Write a (k1, k2) grid as CSV: row index i = 1..k1, columns j = 1..k2 (1-based)."""
    values = _array(grid)
    frame = pd.DataFrame(
        values,
        index=pd.RangeIndex(1, values.shape[0] + 1, name=row),
        columns=pd.RangeIndex(1, values.shape[1] + 1, name=col),
    )
    return _atomic_write(Path(path), lambda tmp: frame.to_csv(tmp))


def write_curves_csv(x: Sequence, curves: Mapping[str, Sequence], path, x_name: str) -> Path:
    """Write curves sharing one x axis as CSV: index `x_name`, one column per curve."""
    frame = pd.DataFrame({k: list(v) for k, v in curves.items()}, index=pd.Index(x, name=x_name))
    return _atomic_write(Path(path), lambda tmp: frame.to_csv(tmp))


def _sibling(path: str | Path, suffix: str) -> Path:
    """`path` with a .png/.pdf/.csv suffix (if any) replaced: ("fig3.png", "_dWq.csv") ->
    "fig3_dWq.csv"."""
    path = Path(path)
    if path.suffix.lower() in (".png", ".pdf", ".csv"):
        path = path.with_suffix("")
    return path.parent / f"{path.name}{suffix}"


def _save(fig: Figure, path: str | Path) -> list[Path]:
    """Write `fig` as <path>.png (200 dpi) and <path>.pdf."""
    return [
        _atomic_write(_sibling(path, f".{fmt}"), lambda tmp, f=fmt: fig.savefig(tmp, format=f))
        for fmt in ("png", "pdf")
    ]


# ---------------------------------------------------------------- heatmaps


def _ticks(n: int) -> list[int]:
    """1-based tick labels for n cells: all of them up to 10, else 1 and multiples of a step."""
    if n <= 10:
        return list(range(1, n + 1))
    step = next(s for s in (2, 4, 5, 8, 10, 16, 20, 32, 50, 64, 100, 128, 256) if n / s <= 8)
    return [1] + list(range(step, n + 1, step))


def _heatmap(ax, grid: np.ndarray, title: str, cmap: str):
    """One panel: phi (k1, k2) with i down the y axis and j along the x axis, 0..1."""
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto", interpolation="nearest")
    for n, set_ticks in ((grid.shape[1], ax.set_xticks), (grid.shape[0], ax.set_yticks)):
        labels = _ticks(n)
        set_ticks([t - 1 for t in labels], [str(t) for t in labels])
    ax.set_xlabel("j")
    ax.set_ylabel("i", rotation=0, labelpad=8)
    ax.set_title(title)
    return image


def _heatmap_figure(
    rows: list[list[tuple[np.ndarray, str]]], path, widths: Sequence[float], cmap: str
) -> list[Path]:
    """Panels (grid, title) in rows, `widths` in inches per column, one shared colourbar."""
    if not rows or not rows[0]:
        raise UserError("nothing to plot: give at least one similarity grid")
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(sum(widths) + 0.9, PANEL_HEIGHT * len(rows)), layout="constrained")
        axes = fig.subplots(len(rows), len(widths), squeeze=False,
                            gridspec_kw={"width_ratios": list(widths)})
        for ax_row, panels in zip(axes, rows, strict=True):
            for ax, (grid, title) in zip(ax_row, panels, strict=True):
                image = _heatmap(ax, grid, title, cmap)
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.04, pad=0.02)
        bar.set_label(r"$\phi(i, j)$")
        return _save(fig, path)


def _csvs(grids: Mapping[str, np.ndarray], path) -> list[Path]:
    return [write_grid_csv(g, _sibling(path, f"_{_slug(name)}.csv")) for name, g in grids.items()]


def plot_rank_similarity(grids: Mapping[str, object], path, zoom: int = 8,
                         cmap: str = CMAP) -> list[Path]:
    """Figure 3: phi(A_r=8, A_r=64, i, j) per matrix, then the zoomed i, j <= `zoom` panels.

    grids: title (e.g. "ΔWq") -> (r1, r2) grid, i over A_r=8 (y), j over A_r=64 (x).
    One row: the full grids, then their top-left zoom x zoom corners. CSVs hold the full grids.
    """
    arrays = {name: _array(g) for name, g in grids.items()}
    full = [(g, name) for name, g in arrays.items()]
    zoomed = [(g[:zoom, :zoom], f"{name}, i, j ≤ {zoom}") for name, g in arrays.items()]
    wide = [min(4.0, 1.6 + g.shape[1] / 32) for g, _ in full]
    written = _heatmap_figure([full + zoomed], path, wide + [1.9] * len(zoomed), cmap)
    return written + _csvs(arrays, path)


def plot_similarity_row(grids: Mapping[str, object], path, k: int | None = None,
                        cmap: str = CMAP) -> list[Path]:
    """One row of heatmaps, one per grid (title -> (k1, k2) grid), cropped to the top-left
    k x k (default: all). E.g. Figure 8 as heatmaps: {"r = 4": phi(W, dW_r=4), ...}."""
    arrays = {name: _array(g) for name, g in grids.items()}
    panels = [(g[:k, :k], name) for name, g in arrays.items()]
    widths = [min(3.2, max(2.2, 0.9 + 1.5 * g.shape[1] / g.shape[0])) for g, _ in panels]
    return _heatmap_figure([panels], path, widths, cmap) + _csvs(arrays, path)


def plot_seed_similarity(grids: Mapping[str, object], random_grid, path, k: int | None = None,
                         cmap: str = CMAP) -> list[Path]:
    """Figure 4: phi between A_r=64 of two seeds per matrix, beside a random Gaussian pair.

    grids: title -> (r, r) grid; random_grid: (r, r) from
    `linalg.random_subspace_similarity_grid`. Shows the top-left k x k (default: all).
    """
    return plot_similarity_row({**grids, "Random Gaussian": random_grid}, path, k, cmap)


def plot_layer_similarity(grids: Mapping[str, Mapping[int, object]], path,
                          k: int | None = None, cmap: str = CMAP) -> list[Path]:
    """Figures 6-7 (Appendix H.1): one row of heatmaps across layers per matrix.

    grids: matrix title (e.g. "ΔWq") -> {0-based layer index -> grid}; titles show layers
    1-based ("ΔWq, layer 1"). Every row must list the same layers. Shows the top-left k x k.
    """
    layer_sets = {tuple(layers) for layers in grids.values()}
    if len(layer_sets) != 1:
        raise UserError(f"every matrix needs the same layers, got {sorted(layer_sets)}")
    arrays = {
        f"{name}, layer {layer + 1}": _array(g) for name, layers in grids.items()
        for layer, g in layers.items()
    }
    n_layers = len(next(iter(layer_sets)))
    titled = list(arrays.items())
    rows = [[(g[:k, :k], t) for t, g in titled[r : r + n_layers]]
            for r in range(0, len(titled), n_layers)]
    shape = rows[0][0][0].shape
    width = min(3.0, max(1.9, 1.2 + shape[1] / shape[0] * 0.9))
    return _heatmap_figure(rows, path, [width] * n_layers, cmap) + _csvs(arrays, path)


# ---------------------------------------------------------------- line plots


def _line_axes(xlabel: str, ylabel: str, x: Sequence[int]):
    """A figure with a log-2 x axis whose ticks are exactly the values of x."""
    fig = Figure(figsize=(5.2, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(x), [str(v) for v in x])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def plot_weight_similarity(ks: Sequence[int], curves: Mapping[str, Sequence[float]], path,
                           baselines: Mapping[str, Sequence[float]] | None = None,
                           title: str = r"$\phi(W_q, \Delta W_q)$") -> list[Path]:
    """Figure 8 (Appendix H.3) as lines: phi(W, dW, k, j) against k, W's top-k directions.

    ks: the k values (x axis, log 2); curves: label (e.g. "r = 4") -> phi at each k, with j
    = that run's rank (`linalg.top_singular_similarity`); baselines: curve label -> that
    curve's random expectation max(k, j) / d at each k (it depends on the curve's own j),
    drawn dashed in the curve's colour; curves with equal baselines share the dashed line,
    in alternating dashes of their colours. CSV: one column per curve, then one
    "random, <label>" column per baseline.
    """
    baselines = dict(baselines or {})
    if unknown := sorted(set(baselines) - set(curves)):
        raise UserError(f"baselines for {unknown} have no curve; curves: {sorted(curves)}")
    with matplotlib.rc_context(STYLE):
        fig, ax = _line_axes("k (top-k singular directions of W)", r"$\phi$", ks)
        colours = {label: ax.plot(ks, list(values), marker="o", markersize=3,
                                  label=label)[0].get_color()
                   for label, values in curves.items()}
        _dashed_baselines(ax, ks, baselines, colours)
        ax.set_ylim(0, 1.02)
        ax.set_title(title)
        handles = ax.get_legend_handles_labels()[0]
        if baselines:
            handles.append(Line2D([], [], ls="--", color="0.45",
                                  label="random (dashed, same colour)"))
        ax.legend(handles=handles, loc="upper left")
        written = _save(fig, path)
    table = dict(curves) | {f"random, {label}": v for label, v in baselines.items()}
    return written + [write_curves_csv(ks, table, _sibling(path, ".csv"), "k")]


def _dashed_baselines(ax, ks: Sequence[int], baselines: Mapping[str, Sequence[float]],
                      colours: Mapping[str, str], dash: float = 3.0, gap: float = 2.0) -> None:
    """Each baseline dashed in its curve's colour; equal baselines (e.g. LoRA and full
    fine-tuning at the same r) are drawn once, their colours taking turns along the dashes."""
    groups: dict[tuple[float, ...], list[str]] = {}
    for label, values in baselines.items():
        groups.setdefault(tuple(float(v) for v in values), []).append(label)
    for values, labels in groups.items():
        period = len(labels) * (dash + gap)
        for i, label in enumerate(labels):
            ax.plot(ks, list(values), color=colours[label], lw=1.0,
                    ls=((period - i * (dash + gap)) % period, (dash, period - dash)))


def plot_amplification(ranks: Sequence[int], factors: Mapping[str, Sequence[float]], path,
                       title: str = "Amplification factor") -> list[Path]:
    """Appendix H.4: ||dW||_F / ||U^T W V^T||_F against the rank r, one line per layer.

    ranks: the x values (log 2); factors: label (e.g. "layer 1") -> factor at each rank, in
    layer order. Log y axis; lines coloured in layer order, with a legend up to 8 lines and a
    colourbar of the labels beyond. CSV: one column per label.
    """
    with matplotlib.rc_context(STYLE):
        fig, ax = _line_axes("rank r", r"$\|\Delta W\|_F \,/\, \|U^\top W V^\top\|_F$", ranks)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_log_label))
        ax.yaxis.set_minor_formatter(FuncFormatter(_log_label))
        colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(factors)))
        for colour, (label, values) in zip(colours, factors.items(), strict=True):
            ax.plot(ranks, list(values), marker="o", markersize=3, color=colour, label=label)
        ax.set_title(title)
        if len(factors) <= 8:
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        else:
            _label_colourbar(fig, ax, list(factors), colours)
        written = _save(fig, path)
    return written + [write_curves_csv(ranks, factors, _sibling(path, ".csv"), "r")]


def _log_label(value: float, _pos=None) -> str:
    """Plain tick labels on a log axis (1, 2, 3, 5 times a power of ten; others blank)."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if round(mantissa, 6) in (1, 2, 3, 5) else ""


def _label_colourbar(fig: Figure, ax, labels: list[str], colours: np.ndarray) -> None:
    """A discrete colourbar naming about 6 of the labels, for many lines coloured in order."""
    n = len(labels)
    norm = BoundaryNorm(np.arange(-0.5, n), n)
    bar = fig.colorbar(ScalarMappable(norm, ListedColormap(colours)), ax=ax, pad=0.02)
    shown = sorted({round(t) for t in np.linspace(0, n - 1, 6)})
    bar.set_ticks(shown, labels=[labels[t] for t in shown])
    bar.ax.minorticks_off()
