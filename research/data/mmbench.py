"""``mmbench``: MMBench-EN dev (Liu et al. 2024), multiple choice, circular evaluation, no external judge.

lmms-eval ``tasks/mmbench`` (``mmbench_en_dev_static``): ``lmms-lab/MMBench`` config ``en`` split ``dev``
(each question and its circular copies, ``index`` >= 1e6, with the options rotated); prompt
``[<hint> ]<question> There are several options:\\nA. ...`` then ``\\n`` and the letter instruction (which
starts with a newline itself); up to 1024 new tokens, stop string "ASSISTANT:" (applied as the family's
lmms-eval wrapper applies it: ``VLMAdapter.stop_strings``). The letter is read with
lmms-eval's static matching (its ``can_infer``, then ``extract_mcq_answer``) instead of the GPT judge; answers
no letter can be read from are counted (``unparsed``).

The prompt lists the options that are :func:`present`; the matching reads lmms-eval's ``build_choices`` over
A-D instead (:func:`matching_choices`): every option that is not null / NaN, so an absent option a snapshot
stores as the string "nan" is an option text "nan" there ("banana" names it), as in lmms-eval.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

from research.data import DATASETS
from research.data.benchmark import BenchmarkSample, SnapshotBenchmark
from research.data.metrics import mmbench_letter, mmbench_scores
from research.data.snapshot import ImageRef
from research.statistics import UnitScores, mean_units

OPTION_KEYS = ("A", "B", "C", "D", "E")
OPTIONS_HEADER = "There are several options:"


def is_null(value: object) -> bool:
    """``pd.isna`` of a scalar: None or a float NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def present(value: object) -> bool:
    """lmms-eval's test for an option in the prompt (``create_options_prompt``): not null / NaN, not the string
    "nan", not empty."""
    return not is_null(value) and value != "" and value != "nan"


def hint_given(value: object) -> bool:
    """lmms-eval's test for the hint (``mmbench_doc_to_text``): not null / NaN, not "nan" (an empty one is given)."""
    return not is_null(value) and value != "nan"


def matching_choices(row: dict) -> dict[str, str]:
    """The A-D options lmms-eval's static matching reads: ``mmbench_process_results`` records ``doc.get(c, "nan")``
    and ``build_choices`` keeps each that ``pd.isna`` does not drop (null and float NaN; "nan" and "" stay)."""
    values = {key: row.get(key, "nan") for key in OPTION_KEYS[:4]}
    return {key: str(value) for key, value in values.items() if not is_null(value)}


@DATASETS.register("mmbench")
class MMBench(SnapshotBenchmark):
    name = "mmbench"
    folder = "MMBench"
    splits = {"dev": "en"}
    default_split = "dev"
    fields = ("index", "question", "hint", "answer", "A", "B", "category")
    optional_fields = ("C", "D", "E")
    max_new_tokens = 1024
    until = ("ASSISTANT:",)
    summary_counts = ("unparsed",)  # a column of the Table-1 summary
    post_prompt = "\nAnswer with the option's letter from the given choices directly."

    def make_sample(self, row: dict, index: int, image: ImageRef) -> BenchmarkSample:
        options = {key: str(row[key]) for key in OPTION_KEYS if present(row.get(key))}
        listed = OPTIONS_HEADER + "\n" + "\n".join(f"{key}. {text}" for key, text in options.items())
        query = f"{row['question']} {listed}"
        query = f"{row['hint']} {query}" if hint_given(row["hint"]) else query
        target = {"index": int(row["index"]), "options": matching_choices(row)}  # what the matching reads
        return BenchmarkSample(str(row["index"]), image, f"{query}\n{self.post_prompt}", row["answer"], target,
                               row["category"])

    def sample_score(self, row: dict) -> float:
        """This copy alone (the JSONL ``correct``); the headline is circular (:func:`mmbench_scores`)."""
        return float(mmbench_letter(row["prediction"], row["target"]["options"]) == row["answer"])

    def score(self, rows: Sequence[dict]) -> dict[str, float]:
        return mmbench_scores([{**r["target"], "answer": r["answer"], "prediction": r["prediction"]} for r in rows])

    def units(self, rows: Sequence[dict]) -> dict[str, UnitScores]:
        """``accuracy`` over its unit, a question with its circular copies (1 when every copy is right, as
        :func:`mmbench_scores` counts it), x100."""
        groups: dict[int, list[dict]] = defaultdict(list)
        for r in rows:
            groups[r["target"]["index"] % 1_000_000].append(r)
        scored = {key: group for key, group in groups.items() if any(r["target"]["index"] < 1_000_000 for r in group)}
        hits = [self.score(group)["accuracy"] / 100.0 for group in scored.values()]
        return {"accuracy": mean_units([str(key) for key in scored], hits, 100.0)}
