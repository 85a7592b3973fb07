"""Tiny snapshots in the published lmms-lab layout, for tests and for trying a benchmark sweep without the data.

``python -m research.data.fixtures <root>`` writes ``<root>/MME``, ``<root>/GQA``, ``<root>/MMBench``,
``<root>/ScienceQA``, ``<root>/textvqa``, ``<root>/POPE`` and ``<root>/VQAv2``: each the configs, splits, shard
names, column names and types of the lmms-lab repository (as lmms-eval's task files read them), a handful of
rows, small PNG images (``{"bytes", "path"}`` structs, as ``datasets`` stores them), row groups of 100 rows.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
ROW_GROUP = 100  # datasets writes image shards in row groups of 100 rows


def png(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    """A small noisy RGB PNG, different for each seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="PNG")
    return encoded.getvalue()


def image(seed: int, broken: bool = False) -> dict:
    data = png(seed)
    return {"bytes": data[: len(data) // 3] if broken else data, "path": f"{seed}.png"}


def write_shards(directory: Path, config: str, split: str, columns: dict[str, tuple[pa.DataType, list]],
                 shards: int = 1) -> list[Path]:
    """``<directory>/<config>/<split>-0000i-of-0000n.parquet``: ``columns`` split over ``shards`` files."""
    schema = pa.schema([(name, kind) for name, (kind, _) in columns.items()])
    table = pa.table({name: pa.array(values, type=kind) for name, (kind, values) in columns.items()}, schema=schema)
    folder = directory / config
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, table.num_rows, shards + 1).astype(int)
    files = []
    for i in range(shards):
        path = folder / f"{split}-{i:05d}-of-{shards:05d}.parquet"
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), path, row_group_size=ROW_GROUP)
        files.append(path)
    return files


S, I64, I8, B = pa.string(), pa.int64(), pa.int8(), pa.bool_()


def mme(root: Path, broken: int | None = None) -> Path:
    """Two images x two questions: one perception subtask (existence), one cognition (code_reasoning)."""
    directory = root / "MME"
    ids = ["000000001.jpg", "000000001.jpg", "0020.png", "0020.png"]
    write_shards(directory, "data", "test", {
        "question_id": (S, ids),
        "image": (IMAGE, [image(i // 2, broken == i) for i in range(4)]),
        "question": (S, ["Is there a dog in this image? Please answer yes or no.",
                         "Is there a cat in this image? Please answer yes or no.",
                         "Is the output of the code 5? Please answer yes or no.",
                         "Is the output of the code 6? Please answer yes or no."]),
        "answer": (S, ["Yes", "No", "Yes", "No"]),
        "category": (S, ["existence", "existence", "code_reasoning", "code_reasoning"]),
    }, shards=2)
    return directory


def gqa(root: Path, broken: int | None = None) -> Path:
    """Four questions on two images (questions and images in their two configs, joined by imageId)."""
    directory = root / "GQA"
    write_shards(directory, "testdev_balanced_instructions", "testdev", {
        "id": (S, ["201307251", "201640614", "202225914", "20899438"]),
        "imageId": (S, ["n161313", "n161313", "n235859", "n235859"]),
        "question": (S, ["Is it overcast?", "Who is wearing the dress?", "What color is the square?",
                         "Is the circle red?"]),
        "answer": (S, ["no", "woman", "red", "yes"]),
        "fullAnswer": (S, ["It is clear.", "The woman is wearing a dress.", "The square is red.", "Yes, it is."]),
        "isBalanced": (B, [True] * 4),
    })
    write_shards(directory, "testdev_balanced_images", "testdev", {
        "id": (S, ["n235859", "n161313"]),
        "image": (IMAGE, [image(10, broken == 0), image(11, broken == 1)]),
    })
    return directory


def mmbench(root: Path, broken: int | None = None) -> Path:
    """Question 0 and its circular copy 1000000 (options rotated), question 1 (three options) and question 2
    (three options): an absent hint and option D written both ways, null (question 1) and "nan" (question 2)."""
    directory = root / "MMBench"
    write_shards(directory, "en", "dev", {
        "index": (I64, [0, 1000000, 1, 2]),
        "question": (S, ["What is the main colour?", "What is the main colour?", "Which shape is shown?",
                         "Which fruit is shown?"]),
        "hint": (S, ["The picture is a painting.", "The picture is a painting.", None, "nan"]),
        "A": (S, ["red", "blue", "circle", "banana"]),
        "B": (S, ["blue", "green", "square", "apple"]),
        "C": (S, ["green", "yellow", "triangle", "plum"]),
        "D": (S, ["yellow", "red", None, "nan"]),
        "answer": (S, ["A", "D", "B", "A"]),
        "category": (S, ["attribute_recognition", "attribute_recognition", "object_localization",
                         "attribute_recognition"]),
        "image": (IMAGE, [image(20 + i, broken == i) for i in range(4)]),
        "source": (S, ["MMBench"] * 4),
        "L2-category": (S, ["finegrained_perception (instance-level)"] * 4),
        "comment": (S, [None] * 4),
        "split": (S, ["dev"] * 4),
    })
    return directory


def scienceqa_img(root: Path, broken: int | None = None) -> Path:
    """Three questions with a hint written as "" (questions 0 and 2) or given (1), and one (3) with a null hint."""
    directory = root / "ScienceQA"
    write_shards(directory, "ScienceQA-IMG", "test", {
        "image": (IMAGE, [image(30 + i, broken == i) for i in range(4)]),
        "question": (S, ["Which of these states is farthest north?", "Which animal's feet are adapted for digging?",
                         "What is the colour?", "Which is a mammal?"]),
        "choices": (pa.list_(S), [["West Virginia", "Louisiana", "Arizona", "Oklahoma"], ["mole", "horse"],
                                  ["red", "blue", "green"], ["trout", "otter"]]),
        "answer": (I8, [0, 0, 2, 1]),
        "hint": (S, ["", "Moles use their feet to dig.", "", None]),
        "task": (S, ["closed choice"] * 4),
        "grade": (S, ["grade2"] * 4),
        "subject": (S, ["social science", "natural science", "natural science", "natural science"]),
        "topic": (S, ["geography", "biology", "physics", "biology"]),
        "category": (S, ["Geography", "Adaptations", "Colours", "Classification"]),
        "skill": (S, ["Read a map: cardinal directions"] * 4),
        "lecture": (S, [""] * 4),
        "solution": (S, [""] * 4),
    })
    return directory


def textvqa(root: Path, broken: int | None = None) -> Path:
    directory = root / "textvqa"
    answers = [["nous les gosses"] * 4 + ["dakota"] * 3 + ["nous"] * 3,
               ["2"] * 2 + ["two"] + ["3"] * 7,
               ["a dog."] * 10]
    write_shards(directory, "data", "validation", {
        "image_id": (S, ["003a8ae2ef43b901", "003a8ae2ef43b901", "00c359f294f7dcd9"]),
        "question_id": (I64, [34602, 34603, 34604]),
        "question": (S, ["what is the brand of this camera?", "how many people?", "WHAT animal is this?"]),
        "question_tokens": (pa.list_(S), [["what"], ["how"], ["what"]]),
        "image": (IMAGE, [image(40 + i, broken == i) for i in range(3)]),
        "image_width": (I64, [40] * 3),
        "image_height": (I64, [32] * 3),
        "flickr_original_url": (S, [""] * 3),
        "flickr_300k_url": (S, [""] * 3),
        "answers": (pa.list_(S), answers),
        "image_classes": (pa.list_(S), [["Camera"]] * 3),
        "set_name": (S, ["val"] * 3),
        "ocr_tokens": (pa.list_(S), [["nous", "les"], [], ["dog"]]),
    })
    return directory


def pope(root: Path, broken: int | None = None) -> Path:
    """The default config (``test``, three settings with ``category``) and ``Full`` (one split per setting)."""
    directory = root / "POPE"
    categories = ["adversarial", "popular", "random"]

    def columns(n: int, category: list[str], seed: int) -> dict:
        return {
            "id": (S, [str(i) for i in range(n)]),
            "question_id": (S, [str(i + 1) for i in range(n)]),
            "question": (S, [f"Is there a {w} in the image?" for w in ["dog", "car", "chair", "person"][:n]]),
            "answer": (S, ["yes", "no", "no", "yes"][:n]),
            "image_source": (S, [f"COCO_val2014_{i:012d}" for i in range(n)]),
            "image": (IMAGE, [image(seed + i, broken == i and seed == 50) for i in range(n)]),
            "category": (S, category),
        }

    write_shards(directory, "data", "test", columns(3, categories, 50))
    for k, category in enumerate(categories):
        write_shards(directory, "Full", category, columns(4, [category] * 4, 60 + 10 * k))
    return directory


def vqav2(root: Path, broken: int | None = None) -> Path:
    directory = root / "VQAv2"
    answer = pa.struct([("answer", S), ("answer_confidence", S), ("answer_id", I64)])

    def records(words: list[str]) -> list[dict]:
        return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]

    write_shards(directory, "data", "validation", {
        "question_type": (S, ["what is the", "how many"]),
        "multiple_choice_answer": (S, ["net", "2"]),
        "answers": (pa.list_(answer), [records(["net"] * 9 + ["netting"]), records(["2"] * 8 + ["two", "3"])]),
        "image_id": (I64, [262148, 393225]),
        "answer_type": (S, ["other", "number"]),
        "question_id": (I64, [262148000, 393225001]),
        "question": (S, ["What is this photo taken looking through?", "How many bowls are there?"]),
        "image": (IMAGE, [image(70 + i, broken == i) for i in range(2)]),
    })
    return directory


WRITERS: dict[str, Callable[..., Path]] = {
    "mme": mme, "gqa": gqa, "mmbench": mmbench, "scienceqa_img": scienceqa_img, "textvqa": textvqa, "pope": pope,
    "vqav2": vqav2,
}


def write_all(root: Path) -> list[Path]:
    return [write(root) for write in WRITERS.values()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m research.data.fixtures <root>  (writes tiny lmms-lab snapshots under <root>)",
              file=sys.stderr)
        return 2
    for directory in write_all(Path(argv[0])):
        print(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
