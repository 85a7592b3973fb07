"""Figures for reports: kept-token overlays, accuracy-vs-budget curves, heatmaps and histograms.

Figures are built on the Agg canvas directly (no ``pyplot``), so nothing is shown, nothing global is
registered and the caller owns every returned ``Figure`` (``fig.savefig(...)`` to write it).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

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


def _reference_lines(ax, vanilla: float | None, chance: float | None) -> None:
    """Vanilla (dashed grey) and chance (dotted red) as horizontal lines, each skipped when ``None``."""
    if vanilla is not None:
        ax.axhline(vanilla, color="grey", linestyle="--", label="vanilla")
    if chance is not None:
        ax.axhline(chance, color="tab:red", linestyle=":", label="chance")


def _title(title: str, n: int | None) -> str:
    return title if n is None else f"{title} (N = {n})"


def accuracy_vs_budget(results: dict[str, Sequence[tuple[float, float]]], vanilla: float | None,
                       chance: float | None = None, n: int | None = None) -> Figure:
    """Accuracy against the average retained vision tokens, one line per scorer.

    Args:
        results: Scorer name -> ``[(budget, accuracy), ...]``.
        vanilla: Unpruned accuracy, drawn as a dashed horizontal line; ``None`` to omit.
        chance: Chance-level accuracy, drawn as a dotted line; ``None`` to omit.
        n: Number of evaluated samples, stated in the title; ``None`` for no title.

    Returns:
        A single-axes figure.
    """
    return _accuracy_curves(results, vanilla, chance, n, "average retained vision tokens", "accuracy vs budget")


def accuracy_vs_flops(results: dict[str, Sequence[tuple[float, float]]], vanilla: float | None,
                      chance: float | None = None, n: int | None = None) -> Figure:
    """Accuracy against the prefill FLOPs relative to vanilla, one line (or point) per scorer / schedule.

    Args:
        results: Scorer name -> ``[(flops_ratio, accuracy), ...]``.
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


def _accuracy_curves(results: dict[str, Sequence[tuple[float, float]]], vanilla: float | None,
                     chance: float | None, n: int | None, xlabel: str, title: str) -> Figure:
    fig = _new_figure((5.0, 3.6))
    ax = fig.subplots()
    for name, points in results.items():
        pts = sorted(points)
        ax.plot([b for b, _ in pts], [a for _, a in pts], marker="o", label=name)
    _reference_lines(ax, vanilla, chance)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    if n is not None:
        ax.set_title(_title(title, n), fontsize=10)
    ax.grid(alpha=0.3)
    if results or vanilla is not None or chance is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_ratio_bars(ratios: dict[str, float], chance_ratio: float | None = None, n: int | None = None) -> Figure:
    """One horizontal bar per combination: its accuracy relative to vanilla (vanilla = 1, a dashed line).

    Args:
        ratios: Combination label -> accuracy / vanilla accuracy, drawn top to bottom in this order.
        chance_ratio: Chance-level accuracy / vanilla accuracy, drawn as a dotted line; ``None`` to omit.
        n: Number of evaluated samples, stated in the title; ``None`` for no title.

    Returns:
        A single-axes figure.
    """
    labels = list(ratios)
    fig = _new_figure((6.5, 1.2 + 0.35 * max(len(labels), 2)))
    ax = fig.subplots()
    ax.barh(np.arange(len(labels)), [ratios[k] for k in labels], height=0.7)
    ax.set_yticks(np.arange(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", linestyle="--", label="vanilla")
    if chance_ratio is not None:
        ax.axvline(chance_ratio, color="tab:red", linestyle=":", label="chance")
    ax.set_xlabel("accuracy / vanilla accuracy")
    if n is not None:
        ax.set_title(_title("accuracy ratio per combination", n), fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
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
