"""``mme``: MME (Fu et al. 2023), perception and cognition yes/no questions, two per image.

lmms-eval ``tasks/mme``: ``lmms-lab/MME``, split ``test``; the prompt drops the question's own " Please answer
yes or no." and appends the short-answer suffix; 16 new tokens. Headline ``total`` = perception + cognition
(AdaptInfer Table 1's MME column, 1864 for LLaVA-1.5-7B).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

from research.data import DATASETS
from research.data.benchmark import BenchmarkSample, SnapshotBenchmark, log_dropped
from research.data.metrics import mme_correct, mme_scores
from research.data.snapshot import ImageRef
from research.statistics import UnitScores, stratified_sum_units

OWN_SUFFIX = " Please answer yes or no."


@DATASETS.register("mme")
class MME(SnapshotBenchmark):
    name = "mme"
    folder = "MME"
    splits = {"test": None}
    default_split = "test"
    fields = ("question_id", "question", "answer", "category")
    max_new_tokens = 16
    headline = "total"
    paper_scale = 1.0

    def prompt(self, question: str) -> str:
        """lmms-eval ``mme_doc_to_text``: the suffix replaces the question's own only when one is added."""
        question = question.strip()
        if self.pre_prompt:
            question = self.pre_prompt + question.replace(OWN_SUFFIX, "")
        if self.post_prompt:
            question = question.replace(OWN_SUFFIX, "") + self.post_prompt
        return question

    def make_sample(self, row: dict, index: int, image: ImageRef) -> BenchmarkSample:
        target = {"question_id": row["question_id"], "category": row["category"]}
        return BenchmarkSample(f"{row['question_id']}#{index}", image, self.prompt(row["question"]), row["answer"],
                               target, row["category"])

    def sample_score(self, row: dict) -> float:
        return mme_correct(row["prediction"], row["answer"])

    def score(self, rows: Sequence[dict]) -> dict[str, float]:
        """:func:`mme_scores` over the images whose two questions were both answered (a skipped image or a
        ``data.limit`` cutting a pair leaves one: that image is left out and counted as ``incomplete_pairs``)."""
        records = [{**r["target"], "score": self.sample_score(r)} for r in rows]
        counts = Counter((r["category"], r["question_id"]) for r in records)
        complete = [r for r in records if counts[r["category"], r["question_id"]] == 2]
        incomplete = sum(1 for n in counts.values() if n != 2)
        log_dropped(self.name, len(records) - len(complete), f"{incomplete} image(s) without both questions")
        if not complete:
            raise ValueError(f"{self.description}: no image has both of its questions answered")
        return {**mme_scores(complete), "incomplete_pairs": float(incomplete)}

    def units(self, rows: Sequence[dict]) -> dict[str, UnitScores]:
        """``total`` over its unit, the image with its two questions (accuracy + accuracy+ of the pair, x100),
        resampled within its subtask: the score is the sum of the subtasks' means (images without both
        questions are left out, as :meth:`score` leaves them)."""
        pairs: dict[tuple[str, str], list[float]] = defaultdict(list)
        for r in rows:
            pairs[r["target"]["category"], r["target"]["question_id"]].append(self.sample_score(r))
        complete = {key: scores for key, scores in pairs.items() if len(scores) == 2}
        values = [100.0 * sum(scores) / 2 + 100.0 * (sum(scores) == 2) for scores in complete.values()]
        return {"total": stratified_sum_units([f"{c}/{q}" for c, q in complete], values,
                                              [c for c, _ in complete])}
