"""Report figures: panel counts, kept-vs-pruned brightness of the overlay, PNG rendering."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from matplotlib.figure import Figure

from research.report.figures import (
    accuracy_ratio_bars,
    accuracy_vs_budget,
    accuracy_vs_flops,
    heatmap,
    histogram_bars,
    patch_mask,
    token_overlay,
)


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


def test_accuracy_vs_budget_marks_chance_and_states_n() -> None:
    fig = accuracy_vs_budget({"random": [(24, 0.3), (48, 0.4)]}, vanilla=0.6, chance=0.25, n=6)
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["random", "vanilla", "chance"]
    assert ax.get_title() == "accuracy vs budget (N = 6)"
    _png(fig)


def test_accuracy_vs_flops_marks_vanilla_chance_and_n() -> None:
    fig = accuracy_vs_flops({"random / layers[0-2]": [(0.4, 0.3)], "fastv": [(0.5, 0.5), (0.3, 0.2)]},
                            vanilla=0.6, chance=0.2, n=12)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.lines]
    assert labels[:4] == ["random / layers[0-2]", "fastv", "vanilla", "chance"]
    assert list(ax.lines[1].get_xdata()) == [0.3, 0.5]  # sorted by FLOPs ratio
    assert list(ax.lines[-1].get_xdata()) == [1.0] and list(ax.lines[-1].get_ydata()) == [0.6]  # vanilla's point
    assert "N = 12" in ax.get_title() and "FLOPs" in ax.get_xlabel()
    _png(fig)
    assert len(accuracy_vs_flops({}, vanilla=None).axes[0].lines) == 0


def test_accuracy_ratio_bars_one_bar_per_combination() -> None:
    ratios = {"random / layers[0-2] / 24": 0.5, "text_prior / layers[0-2] / 24": 0.9}
    fig = accuracy_ratio_bars(ratios, chance_ratio=0.4, n=6)
    ax = fig.axes[0]
    assert len(ax.patches) == 2
    assert [t.get_text() for t in ax.get_yticklabels()] == list(ratios)
    assert [line.get_label() for line in ax.lines] == ["vanilla", "chance"]
    assert list(ax.lines[0].get_xdata()) == [1.0, 1.0]
    assert ax.get_title() == "accuracy ratio per combination (N = 6)"
    _png(fig)


def test_token_overlay_caption_carries_question_answer_and_prediction() -> None:
    caption = "Q: what color is the circle ? | A: red | prediction: blue"
    fig = token_overlay(_grey(16, 16), 4, [np.arange(8)], ["after layer 2: 8 kept"], caption=caption)
    text = fig.get_suptitle().replace("\n", " ")
    assert "prediction: blue" in text and "A: red" in text and "what color is the circle ?" in text
    assert fig.axes[1].get_title() == "after layer 2: 8 kept"
    _png(fig)
    assert token_overlay(_grey(16, 16), 4, [np.arange(8)], ["x"]).get_suptitle() == ""


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
