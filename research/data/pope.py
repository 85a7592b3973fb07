"""``pope``: POPE (Li et al. 2023), object-hallucination yes/no questions.

lmms-eval ``tasks/pope``: ``lmms-lab/POPE``; split ``test`` (default config: the three settings together,
``category`` says which) or ``random`` / ``popular`` / ``adversarial`` (config ``Full``, as ``pope_random``,
``pope_pop``, ``pope_adv``); the short-answer suffix; 128 new tokens. A prediction counts only when it is
exactly "yes" or "no" after lowercasing and stripping (lmms-eval's rule: "Yes." is wrong).
"""

from __future__ import annotations

from collections.abc import Sequence

from research.data import DATASETS
from research.data.benchmark import BenchmarkSample, SnapshotBenchmark
from research.data.metrics import pope_scores
from research.data.snapshot import ImageRef


@DATASETS.register("pope")
class POPE(SnapshotBenchmark):
    name = "pope"
    folder = "POPE"
    splits = {"test": None, "random": "Full", "popular": "Full", "adversarial": "Full"}
    default_split = "test"
    fields = ("question_id", "question", "answer")
    optional_fields = ("category",)
    max_new_tokens = 128

    def make_sample(self, row: dict, index: int, image: ImageRef) -> BenchmarkSample:
        return BenchmarkSample(f"{row['question_id']}#{index}", image, self.prompt(row["question"].strip()),
                               row["answer"], row["answer"], row.get("category"))

    def sample_score(self, row: dict) -> float:
        return float(row["prediction"].lower().strip() == row["answer"].lower().strip())

    def score(self, rows: Sequence[dict]) -> dict[str, float]:
        """:func:`pope_scores`, in percent (accuracy is the headline; ``f1`` is what POPE papers print)."""
        scores = pope_scores([r["prediction"] for r in rows], [r["answer"] for r in rows])
        return {key: 100.0 * value for key, value in scores.items()}
