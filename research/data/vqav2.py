"""``vqav2``: VQAv2 val (Goyal et al. 2017), ten reference answers per question.

lmms-eval ``tasks/vqav2`` (``vqav2_val``): ``lmms-lab/VQAv2`` split ``validation``; the short-answer suffix;
16 new tokens; VQA accuracy after the punctuation and digit/article steps only (no ``word_tokenize``).
"""

from __future__ import annotations

from research.data import DATASETS
from research.data.benchmark import BenchmarkSample, SnapshotBenchmark
from research.data.metrics import vqav2_accuracy
from research.data.snapshot import ImageRef


@DATASETS.register("vqav2")
class VQAv2(SnapshotBenchmark):
    name = "vqav2"
    folder = "VQAv2"
    splits = {"validation": None}
    default_split = "validation"
    fields = ("question_id", "question", "answers")
    optional_fields = ("answer_type",)
    max_new_tokens = 16

    def make_sample(self, row: dict, index: int, image: ImageRef) -> BenchmarkSample:
        answers = [a["answer"] if isinstance(a, dict) else str(a) for a in row["answers"] or []]
        return BenchmarkSample(str(row["question_id"]), image, self.prompt(row["question"]),
                               answers[0] if answers else "", answers, row.get("answer_type"))

    def sample_score(self, row: dict) -> float:
        return vqav2_accuracy(row["prediction"], row["target"])
