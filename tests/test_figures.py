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
    assert ax.get_title(loc="right") == "accuracy ratio (N = 6)"
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


LONG_LABELS = [f"random(seed={i})/text_prior/64" for i in range(5)] + [
    "layers[1-10-20_of32]/text_prior/64", "uniform(num_stages=3,start=1)/text_prior/64",
    "uniform(num_stages=4,start=0)/text_prior/64", "changepoint(samples=200)@val/text_prior/64",
    "single(layer=1)/text_prior/64"]


def _texts(fig: Figure) -> list:
    from matplotlib.text import Text

    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _assert_readable_on_a_card(fig: Figure) -> None:
    """At TensorBoard's ~500 px card width every text is >= 9 pt and no two texts overlap."""
    fig.canvas.draw()
    scale = min(1.0, 500 / (fig.get_figwidth() * fig.dpi))  # TensorBoard shrinks a wider image to the card
    texts = _texts(fig)
    small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() * scale < 9]
    assert not small, small
    ticks = {id(t): axis for ax in fig.axes for axis, labels in (("x", ax.get_xticklabels()),
                                                                 ("y", ax.get_yticklabels())) for t in labels}
    boxes = [(t.get_text(), ticks.get(id(t), "text"), t.get_window_extent()) for t in texts]
    overlapping = [(a, b) for i, (a, kind_a, box_a) in enumerate(boxes) for b, kind_b, box_b in boxes[i + 1:]
                   if box_a.overlaps(box_b) and {kind_a, kind_b} != {"x", "y"}]  # the corner where two axes meet
    assert not overlapping, overlapping


def test_summary_figures_are_readable_at_card_size_with_long_legends_outside() -> None:
    ratios = {label: 0.9 - 0.01 * i for i, label in enumerate(LONG_LABELS)}
    _assert_readable_on_a_card(accuracy_ratio_bars(ratios, chance_ratio=0.4, n=200))
    lines = {label.rsplit("/", 1)[0]: [(0.5 + 0.01 * i, 0.5), (0.7, 0.6 - 0.01 * i)] for i, label in
             enumerate(LONG_LABELS)}
    for figure in (accuracy_vs_flops(lines, vanilla=0.6, chance=0.25, n=200),
                   accuracy_vs_budget(lines, vanilla=0.6, chance=0.25, n=200)):
        _assert_readable_on_a_card(figure)
        ax = figure.axes[0]
        assert ax.get_legend() is None and figure.legends  # a long legend lies below the axes, not on the lines
        assert not figure.legends[0].get_window_extent().overlaps(ax.get_window_extent())


def test_identical_plans_are_marked_and_intervals_drawn() -> None:
    from research.report.figures import RELEVANT_RECALL, Point, layer_curves

    same = {"random(seed=2)/text_prior/64": "single(layer=1)/text_prior/64"}
    ratios = {"single(layer=1)/text_prior/64": 0.9, "random(seed=2)/text_prior/64": 0.9}
    fig = accuracy_ratio_bars(ratios, intervals={"single(layer=1)/text_prior/64": (0.8, 0.95)}, same_as=same)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "single(layer=1)/text_prior/64", "random(seed=2)/text_prior/64\n= single(layer=1)/text_prior/64"]
    assert [bool(p.get_hatch()) for p in ax.patches] == [False, True]  # the second hides nothing: hatched
    assert any(getattr(c, "errorbar", None) is not None for c in ax.containers)
    _assert_readable_on_a_card(fig)
    fig = accuracy_vs_flops({"text_prior": [Point(0.5, 0.6, 0.55, 0.65), Point(0.4, 0.5, same_as="x")]}, 0.7)
    ax = fig.axes[0]
    hollow = [line for line in ax.lines if line.get_markerfacecolor() == "white"]
    assert len(hollow) == 2 and list(hollow[0].get_xdata()) == [0.4]  # the point, and its legend entry
    assert any(getattr(c, "has_yerr", False) for c in ax.containers)
    curves = layer_curves({"a/64": [1.0, 0.5], "b/64": [1.0, 0.5]}, RELEVANT_RECALL, n=8, same_as={"b/64": "a/64"})
    assert [line.get_label() for line in curves.axes[0].lines] == ["a/64", "b/64 = a/64"]
    assert curves.axes[0].lines[1].get_linestyle() == "--" and "N = 8" in curves.axes[0].get_title()
