"""``gqa``: GQA testdev-balanced (Hudson and Manning 2019), short answers.

lmms-eval ``tasks/gqa``: questions in ``lmms-lab/GQA`` config ``testdev_balanced_instructions``, images in
config ``testdev_balanced_images`` (split ``testdev`` of both), joined by ``imageId`` = image ``id`` (here once,
as an index from id to image row; images are read per batch); exact match ignoring case and punctuation.
"""

from __future__ import annotations

from research.data import DATASETS
from research.data.benchmark import BenchmarkSample, SnapshotBenchmark
from research.data.metrics import exact_match
from research.data.snapshot import ImageColumn, ImageRef, SnapshotError, read_columns, shard_files

IMAGES_CONFIG = {"testdev": "testdev_balanced_images"}


@DATASETS.register("gqa")
class GQA(SnapshotBenchmark):
    name = "gqa"
    folder = "GQA"
    splits = {"testdev": "testdev_balanced_instructions"}
    default_split = "testdev"
    fields = ("id", "imageId", "question", "answer")
    max_new_tokens = 16

    def load(self, size: int | None) -> list[BenchmarkSample]:
        files = shard_files(self.directory, self.splits[self.split], self.split)
        questions = read_columns(files, self.fields, self.description)
        rows = questions.slice(0, size).to_pylist() if size is not None else questions.to_pylist()
        image_files = shard_files(self.directory, IMAGES_CONFIG[self.split], self.split)
        ids = read_columns(image_files, ("id",), f"{self.description} images").column("id").to_pylist()
        row_of = {image_id: row for row, image_id in enumerate(ids)}  # the join, once
        missing = sorted({r["imageId"] for r in rows} - row_of.keys())
        if missing:
            raise SnapshotError(f"{self.description}: {len(missing)} imageId(s) of the questions are not in "
                                f"{IMAGES_CONFIG[self.split]} (e.g. {missing[0]!r}); expected every image present")
        images = ImageColumn(image_files, self.image_field, f"{self.description} images")
        return [BenchmarkSample(str(r["id"]), ImageRef(images, row_of[r["imageId"]]), self.prompt(r["question"]),
                                r["answer"], r["answer"]) for r in rows]

    def sample_score(self, row: dict) -> float:
        return exact_match(row["prediction"], row["target"])
