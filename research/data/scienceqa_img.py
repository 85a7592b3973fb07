"""``scienceqa_img``: ScienceQA-IMG (Lu et al. 2022), multiple choice with an image.

lmms-eval ``tasks/scienceqa`` (``scienceqa_img``): ``lmms-lab/ScienceQA`` config ``ScienceQA-IMG`` split
``test``; prompt ``Context: <hint>\\n`` (when there is one), the question, ``A. ...`` per choice and the letter
instruction; 16 new tokens; right when the answer is the letter, or starts with "<LETTER>.". A null hint is
written ``None`` in front of the question, as lmms-eval's ``sqa_doc_to_text`` formats it (an empty one: nothing).
"""

from __future__ import annotations

from research.data import DATASETS
from research.data.benchmark import BenchmarkSample, SnapshotBenchmark
from research.data.metrics import option_letters, scienceqa_correct
from research.data.snapshot import ImageRef

LETTER_INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."


def choices_prompt(question: str, choices: list[str], context: str | None, pre_prompt: str, post_prompt: str) -> str:
    """lmms-eval ``sqa_doc_to_text`` (format ``default``); a ``None`` context is formatted as "None", as there."""
    context = f"Context: {context}\n" if context else context
    listed = "\n".join(f"{letter}. {choice}" for letter, choice in zip(option_letters(len(choices)), choices))
    return f"{pre_prompt}{context}{question}\n{listed}{post_prompt}"


@DATASETS.register("scienceqa_img")
class ScienceQAImg(SnapshotBenchmark):
    name = "scienceqa_img"
    folder = "ScienceQA"
    splits = {"test": "ScienceQA-IMG", "validation": "ScienceQA-IMG", "train": "ScienceQA-IMG"}
    default_split = "test"
    fields = ("question", "choices", "answer", "hint")
    optional_fields = ("subject",)
    max_new_tokens = 16
    post_prompt = LETTER_INSTRUCTION

    def make_sample(self, row: dict, index: int, image: ImageRef) -> BenchmarkSample:
        choices = list(row["choices"])
        letter = option_letters(len(choices))[int(row["answer"])]
        prompt = choices_prompt(row["question"], choices, row["hint"], self.pre_prompt, self.post_prompt)
        return BenchmarkSample(f"{self.split}-{index:05d}", image, prompt, letter, letter, row.get("subject"))

    def sample_score(self, row: dict) -> float:
        return scienceqa_correct(row["prediction"], row["target"])
