"""Benchmark metrics against values computed by hand (as lmms-eval v0.7.3's task files compute them)."""

from __future__ import annotations

import pytest

from research.data.metrics import (
    exact_match,
    extract_mcq_answer,
    mmbench_letter,
    mmbench_scores,
    mme_parse,
    mme_scores,
    normalize_vqa_answer,
    pope_scores,
    scienceqa_correct,
    vqa_accuracy,
    vqav2_accuracy,
)


@pytest.mark.parametrize(("agree", "expected"), [
    # k of 10 annotators gave the prediction: leaving out one of them leaves k-1 matches (k subsets), leaving
    # out another leaves k (10-k subsets); each subset scores min(matches / 3, 1).
    (0, 0.0),
    (1, (1 * 0 + 9 * 1 / 3) / 10),  # 0.3
    (2, (2 * 1 / 3 + 8 * 2 / 3) / 10),  # 0.6
    (3, (3 * 2 / 3 + 7 * 1) / 10),  # 0.9
    (4, 1.0),
])
def test_vqa_accuracy_with_ten_answers_and_k_agreeing(agree, expected):
    references = ["cat"] * agree + ["dog", "bird", "fish", "cow", "horse", "sheep", "goat", "pig", "duck", "hen"][
        : 10 - agree]
    assert vqa_accuracy("cat", references) == pytest.approx(expected)
    assert vqav2_accuracy("cat", references) == pytest.approx(expected)


@pytest.mark.parametrize(("raw", "processed"), [
    ("two", "2"),
    ("Two", "2"),
    ("a dog.", "dog"),
    ("The Dog", "dog"),
    ("dont", "don't"),
    ("don't", "don't"),
    ("3.5", "3.5"),  # a period inside a number stays
    ("yes, sir!", "yes sir"),
    ("1,000", "1000"),
    ("red/blue", "red blue"),  # no space next to "/": replaced by a space
    ("man's hat", "man 's hat"),
])
def test_the_vqa_answer_processor(raw, processed):
    assert normalize_vqa_answer(raw) == processed


def test_processor_edge_cases_decide_vqa_accuracy():
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    assert vqa_accuracy("A dog.", ["dog"] * 3 + ["puppy"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0
    # VQAv2's variant skips word_tokenize: "?" is still handled by the punctuation step, "'s" is not split
    assert vqav2_accuracy("two?", ["2"] * 10) == 1.0


def test_gqa_exact_match_ignores_case_and_punctuation_only():
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match("t-shirt", "tshirt") == 1.0
    assert exact_match("the dog", "dog") == 0.0  # no article removal in exact match
    assert exact_match("two", "2") == 0.0


def test_mme_parse_follows_otter():
    assert [mme_parse(p) for p in ["Yes", "no.", "Y", "n", "x", "Yes, there is", "Not at all", "maybe"]] == [
        "yes", "no", "yes", "no", "other", "yes", "no", "other"]


def test_mme_accuracy_plus_with_one_and_two_correct_answers_of_a_pair():
    records = [
        {"category": "existence", "question_id": "a.jpg", "score": 1.0},  # pair a: both right
        {"category": "existence", "question_id": "a.jpg", "score": 1.0},
        {"category": "existence", "question_id": "b.jpg", "score": 1.0},  # pair b: one right
        {"category": "existence", "question_id": "b.jpg", "score": 0.0},
        {"category": "code_reasoning", "question_id": "c.png", "score": 0.0},  # cognition: one right
        {"category": "code_reasoning", "question_id": "c.png", "score": 1.0},
    ]
    scores = mme_scores(records)
    # existence: a = 100 (acc) + 100 (acc+), b = 50 + 0; mean over images = 125
    assert scores["existence"] == pytest.approx(125.0)
    assert scores["code_reasoning"] == pytest.approx(50.0)
    assert scores["perception"] == pytest.approx(125.0)
    assert scores["cognition"] == pytest.approx(50.0)
    assert scores["total"] == pytest.approx(175.0)
    with pytest.raises(ValueError, match="expected 2"):
        mme_scores(records[:3])


def test_pope_with_an_answer_that_is_neither_yes_nor_no():
    predictions = ["yes", "No", "Yes.", "yes", "no"]
    answers = ["yes", "no", "yes", "no", "yes"]
    scores = pope_scores(predictions, answers)
    # "Yes." is neither: wrong, and not a positive. TP 1, FP 1, FN 1 (the last), TN 1.
    assert scores["accuracy"] == pytest.approx(2 / 5)
    assert scores["precision"] == pytest.approx(1 / 2)
    assert scores["recall"] == pytest.approx(1 / 2)
    assert scores["f1"] == pytest.approx(1 / 2)
    assert scores["yes_ratio"] == pytest.approx(3 / 5)  # lmms-eval: the share of "yes" among the ground truths


def test_scienceqa_letter():
    assert scienceqa_correct("B", "B") == 1.0
    assert scienceqa_correct(" b ", "B") == 1.0
    assert scienceqa_correct("B. Louisiana", "B") == 1.0
    assert scienceqa_correct("The answer is B", "B") == 0.0  # lmms-eval reads only "<LETTER>" or "<LETTER>."
    assert scienceqa_correct("A. West Virginia", "B") == 0.0


def test_mmbench_letter_parsing_and_an_unparseable_answer():
    options = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
    assert mmbench_letter("B", options) == "B"
    assert mmbench_letter("(C)", options) == "C"
    assert mmbench_letter("The colour is yellow", options) == "D"  # by option text
    assert mmbench_letter("I cannot tell.", options) is None  # no letter, no option text: unparsed
    assert extract_mcq_answer("I think the answer is C", ["A", "B", "C", "D"]) == "C"


def test_mmbench_circular_accuracy_counts_unparsed_answers():
    options = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
    rotated = {"A": "blue", "B": "green", "C": "yellow", "D": "red"}
    records = [
        {"index": 0, "answer": "A", "prediction": "A", "options": options},
        {"index": 1000000, "answer": "D", "prediction": "D", "options": rotated},  # both copies right: a hit
        {"index": 1, "answer": "B", "prediction": "B", "options": options},
        {"index": 1000001, "answer": "A", "prediction": "no idea", "options": rotated},  # unparsed copy: a miss
    ]
    scores = mmbench_scores(records)
    assert scores == {"accuracy": 50.0, "unparsed": 1.0}
