"""``textvqa``: TextVQA val (Singh et al. 2019), ten reference answers per question.

lmms-eval ``tasks/textvqa`` (``textvqa_val``): ``lmms-lab/textvqa`` split ``validation``; the question
``capitalize()``d (the rest lowercased, as lmms-eval does), the short-answer suffix, no OCR tokens in the
prompt (lmms-eval's default; the original TextVQA setting of LLaVA adds them); stop string "ASSISTANT:"
(applied as the family's lmms-eval wrapper applies it) with lmms-eval's LLaVA default of 1024 new tokens;
VQA accuracy with the EvalAI processor.
"""

from __future__ import annotations

from research.data import DATASETS
from research.data.benchmark import BenchmarkSample, SnapshotBenchmark
from research.data.metrics import vqa_accuracy
from research.data.snapshot import ImageRef


@DATASETS.register("textvqa")
class TextVQA(SnapshotBenchmark):
    name = "textvqa"
    folder = "textvqa"
    splits = {"validation": None, "train": None}
    default_split = "validation"
    fields = ("question_id", "question", "answers")
    max_new_tokens = 1024
    until = ("ASSISTANT:",)

    def make_sample(self, row: dict, index: int, image: ImageRef) -> BenchmarkSample:
        answers = list(row["answers"] or [])
        return BenchmarkSample(str(row["question_id"]), image, self.prompt(row["question"].capitalize()),
                               answers[0] if answers else "", answers)

    def sample_score(self, row: dict) -> float:
        return vqa_accuracy(row["prediction"], row["target"])
