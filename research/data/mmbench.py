"""``mmbench``: MMBench-EN dev (Liu et al. 2024), multiple choice, circular evaluation, no external judge.

lmms-eval ``tasks/mmbench`` (``mmbench_en_dev_static``): ``lmms-lab/MMBench`` config ``en`` split ``dev``
(each question and its circular copies, ``index`` >= 1e6, with the options rotated); prompt
``[<hint> ]<question> There are several options:\\nA. ...`` then ``\\n`` and the letter instruction (which
starts with a newline itself); up to 1024 new tokens, stopping at "ASSISTANT:". The letter is read with
lmms-eval's static matching (its ``can_infer``, then ``extract_mcq_answer``) instead of the GPT judge; answers
no letter can be read from are counted (``unparsed``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from research.data import DATASETS
from research.data.benchmark import BenchmarkSample, SnapshotBenchmark
from research.data.metrics import mmbench_letter, mmbench_scores
from research.data.snapshot import ImageRef

OPTION_KEYS = ("A", "B", "C", "D", "E")
OPTIONS_HEADER = "There are several options:"


def present(value: object) -> bool:
    """lmms-eval's test for a field: not null / NaN, not the string "nan", not empty."""
    return value is not None and value != "" and value != "nan" and not (isinstance(value, float) and math.isnan(value))


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
        query = f"{row['hint']} {row['question']} {listed}" if present(row["hint"]) else f"{row['question']} {listed}"
        target = {"index": int(row["index"]), "options": options}
        return BenchmarkSample(str(row["index"]), image, f"{query}\n{self.post_prompt}", row["answer"], target,
                               row["category"])

    def sample_score(self, row: dict) -> float:
        """This copy alone (the JSONL ``correct``); the headline is circular (:func:`mmbench_scores`)."""
        return float(mmbench_letter(row["prediction"], row["target"]["options"]) == row["answer"])

    def score(self, rows: Sequence[dict]) -> dict[str, float]:
        return mmbench_scores([{**r["target"], "answer": r["answer"], "prediction": r["prediction"]} for r in rows])
