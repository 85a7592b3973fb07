"""``vqa_jsonl``: a researcher's own data, one JSON object a line.

Each line: ``image`` (a path relative to the file), ``question``, ``answers`` (a list) or ``answer`` (one
string), optionally ``id`` and ``choices`` (a list of option texts; the answer is then one of them or its
letter). Given as ``data.paths.vqa_jsonl=<file.jsonl>`` (or ``<root>/vqa.jsonl``). Scored with VQA accuracy
(``metric: vqa``, the default; fewer than ten references work the same way) or exact match ignoring case and
punctuation against any reference (``metric: exact_match``): ``data.options.vqa_jsonl.metric=exact_match``.
Questions with choices get the ScienceQA-IMG prompt and are scored by their letter.
"""

from __future__ import annotations

import json
from pathlib import Path

from research.data import DATASETS
from research.data.benchmark import BenchmarkSample, SnapshotBenchmark
from research.data.metrics import exact_match, option_letters, scienceqa_correct, vqa_accuracy
from research.data.scienceqa_img import LETTER_INSTRUCTION, choices_prompt
from research.data.snapshot import SnapshotError

METRICS = ("vqa", "exact_match")


@DATASETS.register("vqa_jsonl")
class VqaJsonl(SnapshotBenchmark):
    name = "vqa_jsonl"
    folder = "vqa.jsonl"
    splits = {"test": None}
    default_split = "test"
    fields = ()
    max_new_tokens = 16

    def __init__(self, path: str | None = None, root: str | None = None, split: str | None = None,
                 size: int | None = None, pre_prompt: str | None = None, post_prompt: str | None = None,
                 metric: str = "vqa") -> None:
        if metric not in METRICS:
            raise SnapshotError(f"unknown vqa_jsonl metric {metric!r}; choose one of {list(METRICS)}")
        self.metric = metric
        if not path and root:
            path = str(Path(root) / self.folder)
        if not path:
            raise SnapshotError("benchmark 'vqa_jsonl' needs data.paths.vqa_jsonl=<file.jsonl> (one JSON object a "
                                "line: image, question, answers)")
        if not Path(path).is_file():
            raise SnapshotError(f"vqa_jsonl file {path!r} does not exist; expected one JSON object a line")
        super().__init__(path, None, split, size, pre_prompt, post_prompt)

    def load(self, size: int | None) -> list[BenchmarkSample]:
        file = self.directory
        samples = []
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if size is not None and len(samples) >= size:
                break
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise SnapshotError(f"{file}:{number} is not JSON ({error.msg})") from None
            missing = [key for key in ("image", "question") if key not in item] if isinstance(item, dict) else ["*"]
            if missing or ("answers" not in item and "answer" not in item):
                raise SnapshotError(f"{file}:{number} lacks {missing or ['answers']}; expected fields image, question, "
                                    "answers (or answer), optionally id and choices")
            samples.append(self.sample(item, number, file))
        return samples

    def sample(self, item: dict, number: int, file: Path) -> BenchmarkSample:
        answers = item.get("answers", item.get("answer"))
        answers = [str(a) for a in (answers if isinstance(answers, list) else [answers])]
        image = str(file.parent / item["image"])
        sample_id = str(item.get("id", f"line-{number}"))
        choices = item.get("choices")
        if not choices:
            return BenchmarkSample(sample_id, image, self.prompt(item["question"]), answers[0], answers)
        letters = option_letters(len(choices))
        answer = answers[0]
        if answer in choices:
            answer = letters[choices.index(answer)]
        if answer not in letters:
            raise SnapshotError(f"{file}:{number}: answer {answers[0]!r} is neither one of the choices {choices} nor "
                                f"a letter {letters}")
        prompt = choices_prompt(item["question"], [str(c) for c in choices], "", self.pre_prompt, LETTER_INSTRUCTION)
        return BenchmarkSample(sample_id, image, prompt, answer, {"letter": answer})

    def sample_score(self, row: dict) -> float:
        target = row["target"]
        if isinstance(target, dict):
            return scienceqa_correct(row["prediction"], target["letter"])
        if self.metric == "vqa":
            return vqa_accuracy(row["prediction"], target)
        return max(exact_match(row["prediction"], reference) for reference in target)
