"""Benchmark metrics exactly as lmms-eval computes them (``lmms_eval/tasks/<name>/utils.py``, v0.7.3).

Each function is the scoring of one task file, rewritten without lmms-eval's dependencies; quirks of the
reference are kept on purpose (noted where they matter) so a number here equals lmms-eval's number.

- :func:`vqa_accuracy` / :func:`vqav2_accuracy`: TextVQA / VQAv2 accuracy, ``min(#matches / 3, 1)`` averaged
  over the ten leave-one-out subsets of the references (Antol et al. 2015), after the EvalAI answer processor.
- :func:`exact_match`: GQA (``exact_match`` with ``ignore_case`` and ``ignore_punctuation``).
- :func:`mme_scores`: MME perception and cognition (per subtask: accuracy + accuracy+, x100, summed).
- :func:`pope_scores`: POPE accuracy, precision, recall, F1 and yes-ratio.
- :func:`scienceqa_correct`: ScienceQA-IMG option letter.
- :func:`mmbench_scores`: MMBench dev, circular evaluation with lmms-eval's static (judge-free) answer matching.
"""

from __future__ import annotations

import re
import statistics
import string
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

# ---------------------------------------------------------------- VQA answer processing (EvalAI / mmf)

CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't",
    'dont': "don't", 'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't",
    'havent': "haven't", 'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd",
    'howll': "how'll", 'hows': "how's", "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm", 'Ive': "I've",
    'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've", 'itll': "it'll", "let's": "let's",
    'maam': "ma'am", 'mightnt': "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    'mightve': "might've", 'mustnt': "mustn't", 'mustve': "must've", 'neednt': "needn't", 'notve': "not've",
    'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    'shant': "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", 'shouldve': "should've",
    'shouldnt': "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd',
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll",
    'somebodys': "somebody's", 'someoned': "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    'someonell': "someone'll", 'someones': "someone's", 'somethingd': "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", 'somethingll': "something'll",
    'thats': "that's", 'thered': "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    'therere': "there're", 'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    'theyll': "they'll", 'theyre': "they're", 'theyve': "they've", 'twas': "'twas", 'wasnt': "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", 'weve': "we've", 'werent': "weren't", 'whatll': "what'll",
    'whatre': "what're", 'whats': "what's", 'whatve': "what've", 'whens': "when's", 'whered': "where'd",
    'wheres': "where's", 'whereve': "where've", 'whod': "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    'wholl': "who'll", 'whos': "who's", 'whove': "who've", 'whyll': "why'll", 'whyre': "why're", 'whys': "why's",
    'wont': "won't", 'wouldve': "would've", 'wouldnt': "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", 'yall': "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", 'youd': "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're", 'youve': "you've",
}

NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
              "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the reference's look-behind is a typo'd look-ahead
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
PUNCTUATIONS = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!"]


def process_punctuation(text: str) -> str:
    """Drop or space out punctuation as the VQA evaluation does; periods not inside numbers are removed."""
    out = text
    for p in PUNCTUATIONS:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # sic: the reference passes re.UNICODE (= 32) as ``count``, so at most 32 periods are stripped
    return PERIOD_STRIP.sub("", out, re.UNICODE)


def process_digit_article(text: str) -> str:
    """Lowercase, number words to digits ("two" -> "2"), articles dropped, contractions restored ("dont")."""
    words = [NUMBER_MAP.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(text: str) -> str:
    """``EvalAIAnswerProcessor()(text)``: lowercase, drop "," and "?", split "'s", then punctuation,
    numbers, articles and contractions."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _leave_one_out(prediction: str, references: Sequence[str]) -> float:
    """Mean over the leave-one-out subsets of the references of min(#references equal to the prediction / 3, 1)."""
    if not references:
        raise ValueError("VQA accuracy needs at least one reference answer")
    scores = []
    for i in range(len(references)):
        others = references[:i] + references[i + 1 :]
        scores.append(min(1.0, sum(other == prediction for other in others) / 3))
    return statistics.mean(scores)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """TextVQA (lmms-eval ``textvqa_process_results``): the full EvalAI processor on prediction and references."""
    return _leave_one_out(normalize_vqa_answer(prediction), [normalize_vqa_answer(r) for r in references])


def vqav2_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQAv2 (lmms-eval ``vqav2_process_results``): whitespace cleaned, then punctuation and digits/articles only
    (no ``word_tokenize`` step, unlike TextVQA). Leave-one-out is over the answer records, which differ by
    ``answer_id``, so it is the same as leaving out each position."""
    def clean(text: str) -> str:
        text = text.replace("\n", " ").replace("\t", " ").strip()
        return process_digit_article(process_punctuation(text))

    return _leave_one_out(clean(prediction), [clean(r) for r in references])


# ---------------------------------------------------------------- GQA


_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, reference: str) -> float:
    """lmms-eval's ``exact_match`` with ``ignore_case`` and ``ignore_punctuation`` (GQA): 1.0 or 0.0."""
    return float(prediction.lower().translate(_NO_PUNCTUATION) == reference.lower().translate(_NO_PUNCTUATION))


# ---------------------------------------------------------------- MME


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")


def mme_parse(prediction: str) -> str:
    """"yes", "no" or "other" (lmms-eval ``parse_pred_ans``, from Otter): a one-letter "y"/"n" counts, else
    "yes"/"no" among the first four characters."""
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    prefix = text[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def mme_correct(prediction: str, answer: str) -> float:
    return float(mme_parse(prediction) == answer.lower().strip().replace(".", ""))


def mme_scores(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """MME scores from ``{"category", "question_id", "score"}`` records (one per question; two per image).

    Per subtask: mean over its images of (accuracy + accuracy+) x 100, accuracy+ = both questions of the
    image right; ``perception`` and ``cognition`` sum their subtasks; ``total`` = perception + cognition
    (AdaptInfer Table 1's MME column). Each subtask's score is also returned under its name.
    """
    by_category: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        by_category[record["category"]][record["question_id"]].append(float(record["score"]))
    subtasks = {}
    for category, images in by_category.items():
        total = 0.0
        for question_id, scores in images.items():
            if len(scores) != 2:
                raise ValueError(f"MME image {question_id!r} ({category}) has {len(scores)} questions, expected 2")
            total += 100.0 * sum(scores) / 2 + 100.0 * (sum(scores) == 2)
        subtasks[category] = total / len(images)
    perception = sum(v for k, v in subtasks.items() if k in MME_PERCEPTION)
    cognition = sum(v for k, v in subtasks.items() if k not in MME_PERCEPTION)
    return {"total": perception + cognition, "perception": perception, "cognition": cognition, **subtasks}


# ---------------------------------------------------------------- POPE


def pope_scores(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """POPE (lmms-eval ``pope_aggregate_*``): a prediction counts as "yes"/"no" only when it is exactly that
    (lowercased, stripped); anything else is wrong and is neither a positive nor a negative.

    ``yes_ratio`` is, as in lmms-eval, the share of "yes" among the ground truths (not the predictions).
    """
    preds = [p.lower().strip() for p in predictions]
    truths = [a.lower().strip() for a in answers]
    if not truths:
        raise ValueError("POPE scores of an empty set of predictions")
    tp = sum(p == "yes" and t == "yes" for p, t in zip(preds, truths))
    fp = sum(p == "yes" and t == "no" for p, t in zip(preds, truths))
    fn = sum(p == "no" and t == "yes" for p, t in zip(preds, truths))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    yes, no = truths.count("yes"), truths.count("no")
    return {
        "accuracy": sum(p == t for p, t in zip(preds, truths)) / len(truths),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": yes / (yes + no) if yes + no else 0.0,
    }


# ---------------------------------------------------------------- ScienceQA-IMG


def scienceqa_correct(prediction: str, letter: str) -> float:
    """lmms-eval ``sqa_process_results``: the whole answer is the letter, or it starts with "<LETTER>."."""
    target, pred = letter.strip().lower(), prediction.strip()
    if pred.lower() == target:
        return 1.0
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return float(pred[0].lower() == target)
    return 0.0


# ---------------------------------------------------------------- MMBench (dev, no judge)


def mmbench_infer_option(answer: str, num_choice: int = 5) -> str | None:
    """The option letter a free-form answer names (MMBench ``can_infer_option``), or None."""
    choices = string.ascii_uppercase[:num_choice]
    splits = [x.strip() for x in answer.split()]

    def count(prefix: str = "", suffix: str = "") -> int:
        return sum(prefix + c + suffix in splits for c in choices)

    if count() == 1:
        for ch in choices:
            if "A" in splits and len(splits) > 3:  # "A" may be an article: fall through to the patterns
                break
            if ch in splits:
                return ch
    for prefix, suffix in [("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
                           (":", ""), (":", ","), (":", "."), (":", ")"), (":", ").")]:
        if count(prefix, suffix) == 1:
            for ch in choices:
                if prefix + ch + suffix in splits:
                    return ch
    return None


def mmbench_infer_text(answer: str, options: Mapping[str, str]) -> str | None:
    """The option whose text (lowercased) is the only one contained in the answer (``can_infer_text``)."""
    found = [k for k, text in options.items() if str(text).lower() in answer.lower()]
    return found[0] if len(found) == 1 else None


_ANSWER_PHRASES = ["the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
                   "best answer is", "the correct option is", "correct option is", "the best option is",
                   "best option is", "the choice is", "choice is", "the correct choice is", "correct choice is",
                   "i choose", "i select", "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:",
                   "答案是", "答案为", "选", "答えは"]
_FORMAT_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
                    "space": 2, "fallback": 0}


def extract_mcq_answer(response: str, choices: Sequence[str]) -> str:
    """lmms-eval ``extract_mcq_answer``: the best-ranked choice letter in a response, or "" (none found)."""
    if not response or not response.strip():
        return ""
    text = response.strip()
    for char in [",", ".", "!", "?", ";", ":", "'", '"']:
        text = text.strip(char)
    text = " " + text + " "
    candidates: list[tuple[str, int, str]] = []
    for pattern, kind in (("({})", "parentheses"), ("{}.", "period"), ("{}:", "colon"), ("{})", "right_paren"),
                          ("{} ", "space")):
        candidates += [(ch, text.rfind(pattern.format(ch)), kind) for ch in choices if pattern.format(ch) in text]
    lower = text.lower()
    for phrase in _ANSWER_PHRASES:
        at = lower.find(phrase)
        if at != -1:
            for ch in choices:
                found = text.find(ch, at + len(phrase))
                if found != -1:
                    candidates.append((ch, found, "phrase"))
    stripped = text.strip()
    for ch in choices:
        if stripped.startswith(ch) and (len(stripped) == 1 or not stripped[1].isalpha()):
            candidates.append((ch, 0, "start"))
        if stripped.endswith(ch) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            candidates.append((ch, len(text) - 1, "end"))
    if not candidates:
        candidates = [(ch, text.rfind(ch), "fallback") for ch in choices if ch in text]
    if not candidates:
        return ""
    candidates.sort(key=lambda c: (_FORMAT_PRIORITY[c[2]], c[1]), reverse=True)
    return candidates[0][0]


def mmbench_letter(prediction: str, options: Mapping[str, str]) -> str | None:
    """The letter lmms-eval's static MMBench evaluation reads from a prediction (``can_infer``, then
    ``extract_mcq_answer`` over the A-D options present), or None when it cannot parse one."""
    abcd = {k: v for k, v in options.items() if k in "ABCD"}
    return (mmbench_infer_option(prediction) or mmbench_infer_text(prediction, abcd)
            or extract_mcq_answer(prediction, sorted(abcd)) or None)


def mmbench_scores(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """MMBench dev as lmms-eval's ``mmbench_en_dev_static`` scores it, from ``{"index", "answer", "prediction",
    "options"}`` records: a question (``index`` < 1e6) counts only if it and every circular copy of it
    (``index % 1e6`` equal) parse to the right letter. ``accuracy`` is x100 (as lmms-eval reports it);
    ``unparsed`` counts the predictions no letter could be read from.
    """
    by_index = {int(r["index"]): r for r in records}
    groups: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for index in sorted(by_index):
        groups[index % 1_000_000].append(by_index[index])
    unparsed = sum(mmbench_letter(str(r["prediction"]), r["options"]) is None for r in records)
    mains = [index for index in sorted(by_index) if index < 1_000_000]
    if not mains:
        raise ValueError("MMBench scores need at least one question with index < 1e6")
    hits = 0
    for index in mains:
        rows = groups[index]
        first = [mmbench_infer_option(str(r["prediction"])) or mmbench_infer_text(str(r["prediction"]),
                 {k: v for k, v in r["options"].items() if k in "ABCD"}) for r in rows]
        if any(p and p != r["answer"] for p, r in zip(first, rows)):
            continue
        rest = [extract_mcq_answer(str(r["prediction"]), sorted(k for k in r["options"] if k in "ABCD"))
                for p, r in zip(first, rows) if not p]
        answers = [r["answer"] for p, r in zip(first, rows) if not p]
        hits += all(p and p == a for p, a in zip(rest, answers))
    return {"accuracy": 100.0 * hits / len(mains), "unparsed": float(unparsed)}


# ---------------------------------------------------------------- multiple choice prompts


def option_letters(count: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(count)]

