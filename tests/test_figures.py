"""Report figures: panel counts, kept-vs-pruned brightness of the overlay, PNG rendering."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from matplotlib.figure import Figure

from research.report.figures import accuracy_vs_budget, heatmap, histogram_bars, patch_mask, token_overlay


def _png(fig: Figure) -> bytes:
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    data = buf.getvalue()
    assert data.startswith(b"\x89PNG")
    return data


def _grey(height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), 128, dtype=np.uint8)


def test_token_overlay_panels_and_png() -> None:
    kept = [np.arange(0, 16, 2), np.array([0, 4])]
    fig = token_overlay(_grey(16, 16), 4, kept, ["layer 1", "layer 10"])
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3
    assert [ax.get_title() for ax in fig.axes] == ["input", "layer 1", "layer 10"]
    assert all(len(ax.images) == 1 and not ax.axison for ax in fig.axes)
    _png(fig)


def test_token_overlay_kept_patches_brighter() -> None:
    # 4x4 grid on a 16x16 grey image: patch p covers rows 4*(p//4) .. +4, cols 4*(p%4) .. +4.
    fig = token_overlay(_grey(16, 16), 4, [np.array([0, 5])], ["kept 0, 5"])
    pixels = np.asarray(fig.axes[1].images[0].get_array())
    kept = pixels[0:4, 0:4].mean()  # patch 0
    pruned = pixels[0:4, 4:8].mean()  # patch 1
    assert kept > pruned
    assert pixels[4:8, 4:8].mean() == pytest.approx(kept)  # patch 5 kept
    # the input panel is undimmed
    assert np.asarray(fig.axes[0].images[0].get_array()).mean() == pytest.approx(kept)


def test_token_overlay_non_divisible_image() -> None:
    fig = token_overlay(_grey(15, 22), 3, [np.array([4])], ["centre"])
    pixels = np.asarray(fig.axes[1].images[0].get_array())
    assert pixels.shape[:2] == (15, 22)
    mask = patch_mask(np.array([4]), 3, 15, 22)
    assert mask.sum() == 5 * 7  # rows 5..9, cols 8..14 (grid scaled to the image)
    assert pixels[mask].mean() > pixels[~mask].mean()
    _png(fig)


def test_token_overlay_rejects_bad_indices() -> None:
    with pytest.raises(ValueError):
        token_overlay(_grey(8, 8), 2, [np.array([4])], ["x"])
    with pytest.raises(ValueError):
        token_overlay(_grey(8, 8), 2, [np.array([0])], [])


def test_accuracy_vs_budget() -> None:
    results = {"fastv": [(128, 0.5), (64, 0.4)], "adaptinfer": [(64, 0.45), (128, 0.55)]}
    fig = accuracy_vs_budget(results, vanilla=0.6)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # two scorers + dashed vanilla
    assert ax.lines[-1].get_linestyle() == "--"
    assert list(ax.lines[0].get_xdata()) == [64, 128]  # sorted by budget
    _png(fig)
    assert len(accuracy_vs_budget(results, vanilla=None).axes[0].lines) == 2


def test_heatmap_annotated_small_and_colour_bar() -> None:
    fig = heatmap(np.arange(9.0).reshape(3, 3), ["a", "b", "c"], "overlap")
    assert len(fig.axes) == 2  # heatmap + colour bar
    assert len(fig.axes[0].texts) == 9
    _png(fig)
    big = heatmap(np.zeros((20, 20)), [str(i) for i in range(20)], "big")
    assert len(big.axes[0].texts) == 0


def test_histogram_bars() -> None:
    fig = histogram_bars(np.array([3, 0, 5, 1]), "shifts", "layer")
    assert len(fig.axes) == 1
    assert len(fig.axes[0].patches) == 4
    assert fig.axes[0].get_xlabel() == "layer"
    _png(fig)
