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
from research.statistics import UnitScores, f1_units, mean_units


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

    def units(self, rows: Sequence[dict]) -> dict[str, UnitScores]:
        """``accuracy`` (a 0/1 score per sample) and ``f1`` (2 TP / (2 TP + FP + FN) from each sample's flags,
        a prediction other than exactly "yes" / "no" being neither positive nor negative), a sample a unit."""
        ids = [r["id"] for r in rows]
        said = [r["prediction"].lower().strip() for r in rows]
        truth = [r["answer"].lower().strip() for r in rows]
        return {
            "accuracy": mean_units(ids, [self.sample_score(r) for r in rows], 100.0),
            "f1": f1_units(ids, [p == "yes" and t == "yes" for p, t in zip(said, truth)],
                           [p == "yes" and t == "no" for p, t in zip(said, truth)],
                           [p == "no" and t == "yes" for p, t in zip(said, truth)]),
        }
