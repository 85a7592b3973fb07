"""The synthetic ``shapes`` grounded-VQA benchmark: determinism, answers, masks, labels and keep-sets."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from research.data import DATASETS
from research.data.shapes import (
    ANSWERS,
    COLOUR_RGB,
    COLOURS,
    NUM_PATCHES,
    NUMBERS,
    POSITIONS,
    QTYPES,
    SHAPES,
    TEMPLATES,
    WORDS,
    Sample,
    ShapesVQA,
    accuracy,
    cell_patches,
    make_sample,
    make_scene,
    oracle_keep,
    random_keep,
    tokenize,
    training_scene,
)

# sha256 over the first 50 test samples of image bytes + question + answer (UTF-8), in order
TEST_FINGERPRINT = "26226f4aaebcd11822f5c3e5e42a00b759f29604ddd57efe635943516cbc4be5"
NUM_CHECKED = 300


@pytest.fixture(scope="module")
def test_split() -> list[Sample]:
    return list(ShapesVQA("test"))


def _union(objects, indices) -> np.ndarray:
    mask = np.zeros((12, 12), dtype=bool)
    for i in indices:
        mask |= cell_patches(objects[i].cell)
    return mask


def _expected(sample: Sample) -> tuple[str, np.ndarray, bool]:
    """Re-derive (answer, relevant mask, is-hard-negative) from the objects and the question text."""
    words = sample.question.split()
    objects = sample.objects
    everyone = _union(objects, range(len(objects)))
    if sample.qtype == "colour":
        matches = [i for i, o in enumerate(objects) if o.shape == words[4]]
        assert len(matches) == 1, "colour questions must refer to a unique object"
        return objects[matches[0]].colour, _union(objects, matches), False
    if sample.qtype == "position":
        matches = [i for i, o in enumerate(objects) if (o.colour, o.shape) == (words[3], words[4])]
        assert len(matches) == 1, "position questions must refer to a unique object"
        return POSITIONS[objects[matches[0]].cell], _union(objects, matches), False
    if sample.qtype == "shape":
        cell = POSITIONS.index(words[5])
        matches = [i for i, o in enumerate(objects) if o.cell == cell]
        answer = objects[matches[0]].shape if matches else "nothing"
        return answer, cell_patches(cell), False
    if sample.qtype == "exist":
        matches = [i for i, o in enumerate(objects) if (o.colour, o.shape) == (words[3], words[4])]
        if matches:
            return "yes", _union(objects, matches), False
        hard = words[3] in {o.colour for o in objects} and words[4] in {o.shape for o in objects}
        return "no", everyone, hard
    assert sample.qtype == "count"
    matches = [i for i, o in enumerate(objects) if o.colour == words[2]]
    return NUMBERS[len(matches)], _union(objects, matches) if matches else everyone, False


def test_registered():
    assert DATASETS.get("shapes") is ShapesVQA
    assert len(ShapesVQA("test")) == 1200 and len(ShapesVQA("val")) == 500
    assert len(ShapesVQA("val", size=10)) == 10


def test_deterministic(test_split):
    again = list(ShapesVQA("test"))
    assert len(again) == len(test_split) == 1200
    for a, b in zip(test_split, again):
        assert a.id == b.id and a.question == b.question and a.answer == b.answer
        assert np.array_equal(a.image, b.image) and np.array_equal(a.relevant, b.relevant)
    alone = make_sample("test", 7)
    assert alone.id == "test-000007" == test_split[7].id
    assert np.array_equal(alone.image, test_split[7].image)
    assert (alone.question, alone.answer, alone.objects) == (
        test_split[7].question,
        test_split[7].answer,
        test_split[7].objects,
    )


def test_fingerprint(test_split):
    digest = hashlib.sha256()
    for sample in test_split[:50]:
        digest.update(sample.image.tobytes())
        digest.update(sample.question.encode())
        digest.update(sample.answer.encode())
    assert digest.hexdigest() == TEST_FINGERPRINT


def test_splits_differ():
    assert not np.array_equal(make_sample("test", 0).image, make_sample("val", 0).image)
    assert not np.array_equal(make_sample("train", 0).image, make_sample("val", 0).image)


def test_answers_and_relevant_masks(test_split):
    samples = test_split[:NUM_CHECKED]
    assert Counter(s.qtype for s in samples) == {q: NUM_CHECKED // len(QTYPES) for q in QTYPES}
    hard_negatives = 0
    for sample in samples:
        assert sample.answer in ANSWERS
        assert sample.image.shape == (48, 48, 3) and sample.image.dtype == np.uint8
        assert sample.relevant.shape == (12, 12) and sample.relevant.dtype == bool and sample.relevant.any()
        assert 2 <= len(sample.objects) <= 5 and len({o.cell for o in sample.objects}) == len(sample.objects)
        answer, relevant, hard = _expected(sample)
        assert sample.answer == answer, sample.id
        assert np.array_equal(sample.relevant, relevant), sample.id
        hard_negatives += hard
    exist = [s.answer for s in samples if s.qtype == "exist"]
    assert 0.35 <= exist.count("yes") / len(exist) <= 0.65
    assert hard_negatives >= exist.count("no") / 2
    assert any(s.answer == "nothing" for s in samples) and any(s.answer == "zero" for s in samples)


def test_patch_labels_match_pixels(test_split):
    palette = np.array([COLOUR_RGB[c] for c in COLOURS])  # [6, 3]
    for sample in test_split[:100]:
        patches = sample.image.reshape(12, 4, 12, 4, 3).transpose(0, 2, 1, 3, 4).reshape(12, 12, 16, 3)
        is_colour = (patches[:, :, :, None, :] == palette).all(-1)  # [12, 12, 16, 6]
        assert not (is_colour.sum(-1) > 1).any()
        coloured = is_colour.sum((-1, -2))  # [12, 12] object pixels per patch
        labelled = sample.patch_colour > 0
        assert np.array_equal(labelled, coloured >= 4)
        assert np.array_equal(labelled, sample.patch_shape > 0)
        for r, c in zip(*np.nonzero(labelled)):
            label = sample.patch_colour[r, c] - 1
            assert is_colour[r, c, :, label].sum() == coloured[r, c] >= 4  # every object pixel is that colour
            obj = next(o for o in sample.objects if cell_patches(o.cell)[r, c])
            assert (COLOURS[label], SHAPES[sample.patch_shape[r, c] - 1]) == (obj.colour, obj.shape)


def test_make_scene_object_patches():
    scene = make_scene(np.random.default_rng(0))
    for i, obj in enumerate(scene.objects):
        assert np.array_equal(scene.object_patches(i), cell_patches(obj.cell))
        assert scene.object_patches(i).sum() == 16
        assert (scene.object_id[scene.object_id >= 0] < len(scene.objects)).all()


def test_words_cover_questions_and_answers(test_split):
    assert WORDS == sorted(set(WORDS)) and ANSWERS == sorted(set(ANSWERS))
    assert set(ANSWERS) <= set(WORDS)
    for sample in test_split[:NUM_CHECKED]:
        assert sample.question.endswith(" ?")
        assert set(tokenize(sample.question)) | {sample.answer} <= set(WORDS)
    for template in TEMPLATES.values():
        assert template.endswith(" ?")
    assert tokenize("is there a red circle?") == ["is", "there", "a", "red", "circle", "?"]
    assert all(w == w.lower() and " " not in w for w in WORDS)


def test_unknown_split():
    with pytest.raises(ValueError, match=r"unknown split 'dev'; choose one of \['train', 'val', 'test'\]"):
        ShapesVQA("dev")
    with pytest.raises(ValueError):
        ShapesVQA("test", size=5000)


def test_indexing_and_pil():
    ds = ShapesVQA("val", size=3)
    assert ds[-1].id == "val-000002"
    with pytest.raises(IndexError):
        ds[3]
    image = ds.pil_image(ds[0])
    assert image.size == (48, 48) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), ds[0].image)


def test_training_scene():
    scene, questions = training_scene(5, seed=1, num_questions=3)
    again, same = training_scene(5, seed=1, num_questions=3)
    assert np.array_equal(scene.image, again.image) and [q.text for q in questions] == [q.text for q in same]
    assert len(questions) == 3 and len({q.qtype for q in questions}) == 3
    assert not np.array_equal(scene.image, training_scene(5, seed=2, num_questions=3)[0].image)
    _, many = training_scene(0, seed=0, num_questions=8)
    assert len({q.text for q in many}) == len(many) >= 5


def test_caption_names_every_object_in_cell_order_with_benchmark_words():
    from research.data.shapes import caption

    for index in range(20):
        scene, _ = training_scene(index, seed=0, num_questions=1)
        words = caption(scene).split()
        assert set(words) <= set(WORDS)  # the tokenizer needs no new words
        clauses = [words[i : i + 7] for i in range(0, len(words), 7)]
        assert len(clauses) == len(scene.objects) and len(words) == 7 * len(scene.objects)
        for clause, obj in zip(clauses, scene.objects):
            assert clause == ["the", obj.colour, obj.shape, "is", "at", "the", obj.position]
        assert [obj.cell for obj in scene.objects] == sorted(obj.cell for obj in scene.objects)


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.125, 0.25, 0.5, 1.0])
def test_oracle_keep(test_split, fraction):
    rng = np.random.default_rng(0)
    budget = round(fraction * NUM_PATCHES)
    for sample in test_split[:40]:
        for keep in (
            oracle_keep(sample.relevant, sample.objects_mask, fraction),
            oracle_keep(sample.relevant, sample.objects_mask, fraction, rng),
        ):
            assert len(keep) == budget and len(set(keep.tolist())) == budget
            assert np.all(np.diff(keep) > 0)
            kept = np.zeros(NUM_PATCHES, dtype=bool)
            kept[keep] = True
            relevant = sample.relevant.reshape(-1)
            labelled_relevant = relevant & sample.objects_mask.reshape(-1)
            if relevant.sum() <= budget:
                assert kept[relevant].all()
            else:
                assert relevant[keep].all()
                assert kept[labelled_relevant].all() or labelled_relevant[keep].all()


def test_random_keep_and_accuracy():
    keep = random_keep(0.25, np.random.default_rng(1))
    assert len(keep) == 36 and np.all(np.diff(keep) > 0) and keep.max() < NUM_PATCHES
    assert accuracy([" Red.", "yes it is", "two", ""], ["red", "yes", "three", "no"]) == 0.5
    with pytest.raises(ValueError):
        accuracy(["a"], [])
