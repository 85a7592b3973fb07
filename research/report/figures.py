"""Figures for reports: kept-token overlays, accuracy-vs-budget curves, heatmaps and histograms.

Figures are built on the Agg canvas directly (no ``pyplot``), so nothing is shown, nothing global is
registered and the caller owns every returned ``Figure`` (``fig.savefig(...)`` to write it).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DIM = 0.25  # brightness factor of pruned patches
ANNOTATE_MAX = 16  # heatmaps up to this size per side get their values written in the cells


def _new_figure(figsize: tuple[float, float]) -> Figure:
    """A ``Figure`` attached to an Agg canvas (renders to PNG without a display)."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def patch_mask(kept: np.ndarray, grid: int, height: int, width: int) -> np.ndarray:
    """Pixel mask ``[height, width]``: True where the pixel's patch is among ``kept``.

    Patch indices are flat and row-major over a ``grid x grid`` patch grid; the grid is scaled to the
    image size, so the image need not be divisible by ``grid``.
    """
    kept = np.asarray(kept, dtype=np.int64).ravel()
    if kept.size and (kept.min() < 0 or kept.max() >= grid * grid):
        raise ValueError(f"patch indices must lie in 0 .. {grid * grid - 1}")
    grid_mask = np.zeros(grid * grid, dtype=bool)
    grid_mask[kept] = True
    grid_mask = grid_mask.reshape(grid, grid)
    rows = np.minimum(np.arange(height) * grid // height, grid - 1)
    cols = np.minimum(np.arange(width) * grid // width, grid - 1)
    return grid_mask[rows[:, None], cols[None, :]]


def dim_pruned(image: np.ndarray, mask: np.ndarray, factor: float = DIM) -> np.ndarray:
    """``image`` as floats in [0, 1] with pixels outside ``mask`` desaturated and scaled by ``factor``."""
    rgb = image.astype(np.float32) / 255.0
    grey = np.repeat(rgb.mean(axis=-1, keepdims=True), 3, axis=-1)
    return np.where(mask[..., None], rgb, grey * factor)


def token_overlay(
    image: np.ndarray,
    grid: int,
    kept_per_stage: Sequence[np.ndarray],
    titles: Sequence[str],
    caption: str | None = None,
) -> Figure:
    """The input image, then one panel per pruning stage with the pruned patches dimmed.

    Args:
        image: ``[H, W, 3]`` uint8 image.
        grid: Patches per side of the vision tower's patch grid.
        kept_per_stage: Per stage, the sorted flat (row-major) patch indices kept after that stage.
        titles: One title per stage.
        caption: Figure title above the panels (e.g. question, answer and prediction); wrapped to the
            figure's width; ``None`` for none.

    Returns:
        A figure with ``len(kept_per_stage) + 1`` image panels.
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {image.shape}")
    if len(titles) != len(kept_per_stage):
        raise ValueError(f"{len(titles)} titles for {len(kept_per_stage)} stages")
    height, width = image.shape[:2]
    panels = len(kept_per_stage) + 1
    fig = _new_figure((2.2 * panels, 2.4))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    axes[0].imshow(image.astype(np.float32) / 255.0)
    axes[0].set_title("input", fontsize=9)
    for ax, kept, title in zip(axes[1:], kept_per_stage, titles):
        ax.imshow(dim_pruned(image, patch_mask(kept, grid, height, width)))
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    top = 0.88
    if caption:
        lines = textwrap.wrap(caption, width=max(30, int(22 * panels)))
        fig.set_size_inches(fig.get_figwidth(), fig.get_figheight() + 0.2 * len(lines))
        fig.suptitle("\n".join(lines), fontsize=8)
        top = 0.88 - 0.2 * len(lines) / fig.get_figheight()
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.04)
    return fig


CARD_WIDTH = 5.0  # inches: 500 px at matplotlib's 100 dpi, the width of a TensorBoard image card
FONT = 9  # the smallest font (pt) on a figure meant for a card
LEGEND_INSIDE = 3  # a legend with more entries goes below the axes


@dataclass(frozen=True)
class Point:
    """One combination on an accuracy figure: ``x``, ``y``, the interval of ``y`` (``low``, ``high``; ``None``
    where not known) and ``same_as``: the label of an earlier combination that ran the identical plan ("")."""

    x: float
    y: float
    low: float | None = None
    high: float | None = None
    same_as: str = ""


TOKENS_PER_LAYER = ("image tokens each decoder layer runs on", "image tokens")  # layer_curves' (title, y label)
RELEVANT_RECALL = ("relevant-patch recall per layer", "relevant patches kept")


def _style(index: int) -> dict:
    """The colour and marker of the ``index``-th line: ten colours, then the same with another marker (so an
    eleventh line never looks like the first)."""
    colours, markers = [f"C{i}" for i in range(10)], ["o", "s", "^", "D", "v"]
    return {"color": colours[index % 10], "marker": markers[index // 10 % len(markers)]}


def _error_lengths(values: Sequence[float], bounds: Sequence[tuple[float, float] | None]) -> list[list[float]]:
    """``[below, above]`` error-bar lengths of each value's interval (0 where it has none). An interval that leaves
    its estimate out (a skewed bootstrap) is drawn from the estimate to its far bound."""
    return [[max(0.0, v - b[0]) if b else 0.0 for v, b in zip(values, bounds)],
            [max(0.0, b[1] - v) if b else 0.0 for v, b in zip(values, bounds)]]


def _card_figure(height: float) -> Figure:
    """A figure as wide as a TensorBoard card, its text at least :data:`FONT` pt, laid out so nothing overlaps."""
    fig = Figure(figsize=(CARD_WIDTH, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _legend(fig: Figure, ax, entries: int) -> None:
    """The legend inside the axes when short, else below them (one entry a line, long labels stay whole)."""
    if entries <= LEGEND_INSIDE:
        ax.legend(fontsize=FONT)
        return
    fig.set_size_inches(CARD_WIDTH, fig.get_figheight() + 0.2 * entries)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", fontsize=FONT, ncols=1, frameon=False)


def _reference_lines(ax, vanilla: float | None, chance: float | None) -> None:
    """Vanilla (dashed grey) and chance (dotted red) as horizontal lines, each skipped when ``None``."""
    if vanilla is not None:
        ax.axhline(vanilla, color="grey", linestyle="--", label="vanilla")
    if chance is not None:
        ax.axhline(chance, color="tab:red", linestyle=":", label="chance")


def _title(title: str, n: int | None) -> str:
    return title if n is None else f"{title} (N = {n})"


def _point(point: Point | tuple) -> Point:
    return point if isinstance(point, Point) else Point(*point)


def accuracy_vs_budget(results: dict[str, Sequence[Point | tuple[float, float]]], vanilla: float | None,
                       chance: float | None = None, n: int | None = None) -> Figure:
    """Accuracy against the average retained vision tokens, one line per scorer / schedule.

    Args:
        results: Line label -> its points (:class:`Point`, or ``(budget, accuracy)``); a point's interval is
            drawn as a y error bar, a point with ``same_as`` hollow.
        vanilla: Unpruned accuracy, drawn as a dashed horizontal line; ``None`` to omit.
        chance: Chance-level accuracy, drawn as a dotted line; ``None`` to omit.
        n: Number of evaluated samples, stated in the title; ``None`` for no title.

    Returns:
        A single-axes figure.
    """
    return _accuracy_curves(results, vanilla, chance, n, "average retained vision tokens", "accuracy vs budget")


def accuracy_vs_flops(results: dict[str, Sequence[Point | tuple[float, float]]], vanilla: float | None,
                      chance: float | None = None, n: int | None = None) -> Figure:
    """Accuracy against the prefill FLOPs relative to vanilla, one line (or point) per scorer / schedule.

    Args:
        results: Line label -> its points (:class:`Point`, or ``(flops_ratio, accuracy)``); intervals and
            identical plans drawn as in :func:`accuracy_vs_budget`.
        vanilla: Unpruned accuracy: a dashed horizontal line and a star at FLOPs ratio 1; ``None`` to omit.
        chance: Chance-level accuracy, drawn as a dotted line; ``None`` to omit.
        n: Number of evaluated samples, stated in the title; ``None`` for no title.

    Returns:
        A single-axes figure.
    """
    fig = _accuracy_curves(results, vanilla, chance, n, "prefill FLOPs / vanilla", "accuracy vs FLOPs")
    if vanilla is not None:
        fig.axes[0].plot([1.0], [vanilla], marker="*", markersize=10, color="grey", linestyle="none")
    return fig


def _accuracy_curves(results: dict[str, Sequence[Point | tuple[float, float]]], vanilla: float | None,
                     chance: float | None, n: int | None, xlabel: str, title: str) -> Figure:
    fig = _card_figure(3.4)
    ax = fig.subplots()
    hollow = False
    for index, (name, points) in enumerate(results.items()):
        pts = sorted((_point(p) for p in points), key=lambda p: (p.x, p.y))
        xs, ys = [p.x for p in pts], [p.y for p in pts]
        (line,) = ax.plot(xs, ys, label=name, **_style(index))
        known = [p for p in pts if p.low is not None and p.high is not None]
        if known:
            ax.errorbar([p.x for p in known], [p.y for p in known], fmt="none", capsize=3, color=line.get_color(),
                        yerr=_error_lengths([p.y for p in known], [(p.low, p.high) for p in known]))
        same = [p for p in pts if p.same_as]
        if same:
            hollow = True
            ax.plot([p.x for p in same], [p.y for p in same], marker=line.get_marker(), markersize=9,
                    linestyle="none", markerfacecolor="white", markeredgecolor=line.get_color())
    _reference_lines(ax, vanilla, chance)
    if hollow:  # one legend entry says what a hollow marker is
        ax.plot([], [], marker="o", markerfacecolor="white", markeredgecolor="black", linestyle="none",
                label="same plan as another (see table)")
    ax.set_xlabel(xlabel, fontsize=FONT + 1)
    ax.set_ylabel("accuracy", fontsize=FONT + 1)
    ax.tick_params(labelsize=FONT)
    if n is not None:
        ax.set_title(_title(title, n), fontsize=FONT + 1)
    ax.grid(alpha=0.3)
    entries = len(results) + (vanilla is not None) + (chance is not None) + hollow
    if entries:
        _legend(fig, ax, entries)
    return fig


def accuracy_ratio_bars(ratios: dict[str, float], chance_ratio: float | None = None, n: int | None = None,
                        intervals: dict[str, tuple[float, float]] | None = None,
                        same_as: dict[str, str] | None = None) -> Figure:
    """One horizontal bar per combination: its accuracy relative to vanilla (vanilla = 1, a dashed line).

    Args:
        ratios: Combination label -> accuracy / vanilla accuracy, drawn top to bottom in this order.
        chance_ratio: Chance-level accuracy / vanilla accuracy, drawn as a dotted line; ``None`` to omit.
        n: Number of evaluated samples, stated in the title; ``None`` for no title.
        intervals: Combination label -> the ratio's interval ``(low, high)``, drawn as x error bars.
        same_as: Combination label -> the label of an earlier combination that ran the identical plan: its bar is
            hatched and its tick reads ``<label>`` then ``= <other>`` on a second line.

    Returns:
        A single-axes figure.
    """
    labels, intervals, same_as = list(ratios), intervals or {}, same_as or {}
    lines = len(labels) + sum(1 for k in labels if same_as.get(k))
    fig = _card_figure(1.3 + 0.3 * max(lines, 2))
    ax = fig.subplots()
    values = [ratios[k] for k in labels]
    errors = None
    if any(k in intervals for k in labels):  # a combination without an interval: no bar
        errors = _error_lengths(values, [intervals.get(k) for k in labels])
    bars = ax.barh(np.arange(len(labels)), values, height=0.7, xerr=errors, capsize=3 if errors else 0)
    for bar, k in zip(bars, labels):
        if same_as.get(k):
            bar.set_hatch("//")
            bar.set_facecolor("white")
            bar.set_edgecolor("tab:blue")
    ticks = [f"{k}\n= {same_as[k]}" if same_as.get(k) else k for k in labels]
    ax.set_yticks(np.arange(len(labels)), ticks, fontsize=FONT)
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", linestyle="--", label="vanilla")
    if chance_ratio is not None:
        ax.axvline(chance_ratio, color="tab:red", linestyle=":", label="chance")
    ax.set_xlabel("accuracy / vanilla accuracy", fontsize=FONT + 1)
    ax.tick_params(axis="x", labelsize=FONT)
    if n is not None:
        ax.set_title(_title("accuracy ratio", n), fontsize=FONT + 1, loc="right")
    fig.set_size_inches(CARD_WIDTH, fig.get_figheight() + 0.3)  # the legend below the bars, clear of them
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", fontsize=FONT, ncols=2, frameon=False)
    return fig


def layer_curves(curves: dict[str, Sequence[float]], what: tuple[str, str], n: int | None = None,
                 same_as: dict[str, str] | None = None) -> Figure:
    """A per-layer value of each combination (tokens per layer, relevant-patch recall) as one line each, x = the
    decoder layer: a figure, where TensorBoard's scalar smoothing cannot redraw it.

    Args:
        curves: Combination label -> its value at each decoder layer.
        what: ``(title, y label)``, e.g. :data:`TOKENS_PER_LAYER`.
        n: Number of samples the values were measured on, stated in the title; ``None`` for none.
        same_as: Combination label -> the label of an earlier one with the identical plan: dashed, its legend entry
            ``<label> = <other>``.

    Returns:
        A single-axes figure.
    """
    same_as = same_as or {}
    title, ylabel = what
    fig = _card_figure(3.2)
    ax = fig.subplots()
    for index, (label, values) in enumerate(curves.items()):
        other = same_as.get(label)
        ax.plot(np.arange(len(values)), values, markersize=4, linestyle="--" if other else "-",
                label=f"{label} = {other}" if other else label, **_style(index))
    ax.set_xlabel("decoder layer", fontsize=FONT + 1)
    ax.set_ylabel(ylabel, fontsize=FONT + 1)
    ax.tick_params(labelsize=FONT)
    ax.set_title(_title(title, n), fontsize=FONT + 1)
    ax.grid(alpha=0.3)
    if curves:
        _legend(fig, ax, len(curves))
    return fig


def heatmap(matrix: np.ndarray, labels: Sequence[str], title: str) -> Figure:
    """A labelled heatmap with a colour bar; values are written in the cells up to 16 x 16.

    Args:
        matrix: ``[R, C]`` values.
        labels: Tick labels, used for the rows and/or columns whose count they match.
        title: Axes title.

    Returns:
        A figure with the heatmap axes and the colour-bar axes.
    """
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim != 2:
        raise ValueError(f"matrix must be 2-D, got shape {matrix.shape}")
    rows, cols = matrix.shape
    fig = _new_figure((1.0 + 0.45 * max(cols, 6), 0.8 + 0.4 * max(rows, 6)))
    ax = fig.subplots()
    im = ax.imshow(matrix, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax)
    if len(labels) == cols:
        ax.set_xticks(range(cols), labels, rotation=45, ha="right", fontsize=8)
    if len(labels) == rows:
        ax.set_yticks(range(rows), labels, fontsize=8)
    if rows <= ANNOTATE_MAX and cols <= ANNOTATE_MAX:
        finite = matrix[np.isfinite(matrix)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for i in range(rows):
            for j in range(cols):
                value = matrix[i, j]
                ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=7,
                        color="black" if value > mid else "white")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def histogram_bars(counts: np.ndarray, title: str, xlabel: str) -> Figure:
    """A bar chart of ``counts`` over the integer bins ``0 .. len(counts) - 1``.

    Args:
        counts: Count per bin.
        title: Axes title.
        xlabel: x-axis label.

    Returns:
        A single-axes figure.
    """
    counts = np.asarray(counts).ravel()
    fig = _new_figure((5.0, 3.2))
    ax = fig.subplots()
    ax.bar(np.arange(len(counts)), counts, width=0.8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    fig.tight_layout()
    return fig
