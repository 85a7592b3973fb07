"""Benchmarks read from lmms-lab snapshots: fixtures written in the published layout (research.data.fixtures),
prompts as lmms-eval builds them, one-line errors for bad data, lazy images, undecodable images counted."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from research.data import DATASETS
from research.data.benchmark import BenchmarkSample, SnapshotBenchmark, cut_at_stop
from research.data.fixtures import WRITERS
from research.data.images import decodable, sample_image
from research.data.snapshot import ImageRef, SnapshotError

SNAPSHOT_BENCHMARKS = sorted(WRITERS)
SIZES = {"mme": 4, "gqa": 4, "mmbench": 4, "scienceqa_img": 4, "textvqa": 3, "pope": 3, "vqav2": 2}


def test_every_registered_snapshot_benchmark_has_a_fixture():
    registered = [n for n in DATASETS.names() if isinstance(DATASETS.get(n), type)
                  and issubclass(DATASETS.get(n), SnapshotBenchmark) and n != "vqa_jsonl"]
    assert sorted(registered) == SNAPSHOT_BENCHMARKS


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lmms-lab")
    for write in WRITERS.values():
        write(root)
    return root


@pytest.mark.parametrize("name", SNAPSHOT_BENCHMARKS)
def test_loader_reads_the_fixture_and_scores_the_references_as_perfect(root, name):
    dataset = DATASETS.get(name)(root=str(root))
    samples = list(dataset)
    assert len(samples) == len(dataset) == SIZES[name]
    assert len({s.id for s in samples}) == len(samples)
    for sample in samples:
        assert isinstance(sample, BenchmarkSample) and isinstance(sample.image, ImageRef)
        assert sample_image(sample).size == (40, 32)  # decoded from the snapshot's bytes only now
    rows = [{"prediction": s.answer, "answer": s.answer, "target": s.target} for s in samples]
    scores = dataset.score(rows)
    if name == "mme":  # 2 subtasks x (100 accuracy + 100 accuracy+)
        assert scores["total"] == 400.0 and scores["perception"] == 200.0 and scores["cognition"] == 200.0
    elif name == "textvqa":  # the second question's answers: "2" x2, "two", "3" x7 -> 0.9 (see metric tests)
        assert scores["accuracy"] == pytest.approx(100 * (1 + 0.9 + 1) / 3)
    else:
        assert scores["accuracy"] == 100.0
    assert dataset.headline in scores
    assert len(DATASETS.get(name)(root=str(root), size=2)) == 2


PROMPTS = {
    "mme": "Is there a dog in this image?\nAnswer the question using a single word or phrase.",
    "gqa": "Is it overcast?\nAnswer the question using a single word or phrase.",
    "mmbench": "The picture is a painting. What is the main colour? There are several options:\nA. red\nB. blue\n"
               "C. green\nD. yellow\n\nAnswer with the option's letter from the given choices directly.",
    "scienceqa_img": "Which of these states is farthest north?\nA. West Virginia\nB. Louisiana\nC. Arizona\n"
                     "D. Oklahoma\nAnswer with the option's letter from the given choices directly.",
    "textvqa": "What is the brand of this camera?\nAnswer the question using a single word or phrase.",
    "pope": "Is there a dog in the image?\nAnswer the question using a single word or phrase.",
    "vqav2": "What is this photo taken looking through?\nAnswer the question using a single word or phrase.",
}


@pytest.mark.parametrize("name", SNAPSHOT_BENCHMARKS)
def test_prompt_is_the_harness_prompt(root, name):
    assert next(iter(DATASETS.get(name)(root=str(root)))).question == PROMPTS[name]


def test_prompt_details_hint_context_capitalisation_and_overrides(root):
    mmbench = list(DATASETS.get("mmbench")(root=str(root)))
    assert mmbench[2].question.startswith("Which shape is shown? There are several options:\nA. circle\nB. square\n"
                                          "C. triangle\n\n")  # no hint, no D
    sqa = list(DATASETS.get("scienceqa_img")(root=str(root)))
    assert sqa[1].question.startswith("Context: Moles use their feet to dig.\nWhich animal's")
    textvqa = list(DATASETS.get("textvqa")(root=str(root)))
    assert textvqa[2].question.startswith("What animal is this?")  # str.capitalize, as lmms-eval
    own = DATASETS.get("gqa")(root=str(root), post_prompt=" Answer:")
    assert next(iter(own)).question == "Is it overcast? Answer:"
    mme = DATASETS.get("mme")(root=str(root), post_prompt="")
    assert next(iter(mme)).question == "Is there a dog in this image? Please answer yes or no."


def test_fixture_writes_absent_fields_both_ways(root):
    mmbench = pq.read_table(root / "MMBench" / "en").to_pydict()
    assert {None, "nan"} <= set(mmbench["D"]) and {None, "nan"} <= set(mmbench["hint"])
    assert {None, ""} <= set(pq.read_table(root / "ScienceQA" / "ScienceQA-IMG").column("hint").to_pylist())


def test_mmbench_reads_absent_options_and_hints_as_lmms_eval_does(root):
    """lmms-eval lists an option in the prompt only if it is not null, "nan" or empty (``create_options_prompt``),
    but its static matching keeps every A-D option ``pd.isna`` does not drop (``build_choices`` over
    ``doc.get(c, "nan")``): a "nan" string is an option text there, and "banana" names it as well as A."""
    mmbench = DATASETS.get("mmbench")(root=str(root))
    samples = {s.id: s for s in mmbench}
    null, nan = samples["1"], samples["2"]
    assert nan.question.startswith("Which fruit is shown? There are several options:\nA. banana\nB. apple\n"
                                   "C. plum\n\n")  # neither the "nan" hint nor the "nan" option in the prompt
    assert null.target["options"] == {"A": "circle", "B": "square", "C": "triangle"}
    assert nan.target["options"] == {"A": "banana", "B": "apple", "C": "plum", "D": "nan"}
    banana = {"prediction": "banana", "answer": "A", "target": nan.target}
    assert mmbench.sample_score(banana) == 0.0  # two option texts in the answer, no letter: unparsed
    assert mmbench.sample_score({**banana, "prediction": "A"}) == 1.0
    rows = [{"prediction": s.answer, "answer": s.answer, "target": s.target} for s in mmbench]
    assert mmbench.score([r if r["target"]["index"] != 2 else banana for r in rows])["unparsed"] == 1.0
    row = {"index": 5, "question": "Q?", "hint": "", "answer": "A", "A": "x", "B": "y", "category": "c"}
    assert mmbench.make_sample(row, 0, None).question.startswith(" Q? There are")  # "" is a hint there
    assert mmbench.make_sample(row, 0, None).target["options"] == {"A": "x", "B": "y", "C": "nan", "D": "nan"}


def test_scienceqa_null_hint_is_written_none_as_lmms_eval_writes_it(root):
    samples = list(DATASETS.get("scienceqa_img")(root=str(root)))
    assert samples[0].question.startswith("Which of these states")  # an empty hint: nothing
    assert samples[3].question == ("NoneWhich is a mammal?\nA. trout\nB. otter\n"
                                   "Answer with the option's letter from the given choices directly.")


def test_gqa_joins_questions_to_images_by_id(root):
    samples = list(DATASETS.get("gqa")(root=str(root)))
    # the images config lists n235859 first: questions on n161313 point at its second row
    assert [s.image.row for s in samples] == [1, 1, 0, 0]


def test_pope_splits_are_lmms_eval_configs(root):
    assert len(DATASETS.get("pope")(root=str(root), split="adversarial")) == 4
    assert {s.qtype for s in DATASETS.get("pope")(root=str(root))} == {"adversarial", "popular", "random"}


# lmms-eval 0.7.3: the task file's ``until``, else its ``fewshot_delimiter`` "\n\n" (lmms_eval/api/task.py)
UNTIL = {"mme": ("\n\n",), "gqa": ("\n\n",), "mmbench": ("ASSISTANT:",), "scienceqa_img": ("\n\n",),
         "textvqa": ("ASSISTANT:",), "pope": ("\n\n",), "vqav2": ("\n\n",)}
# What lmms-eval's wrapper for each family makes of a GQA answer and an MMBench answer (ANSWERS): llava_hf,
# llava_onevision, internvl3 and mistral3_vl never apply ``until``; qwen2_vl cuts at every stop string; qwen2_5_vl
# removes "\n\n" from ``until`` first, as do qwen3_vl and gemma3 (lmms_eval/models/simple/<wrapper>.py, generate_until).
ANSWERS = ("wood\n\nIt is wood", "square\nASSISTANT: circle")
CUT = {"llava15": ANSWERS, "llava_next": ANSWERS, "llava_onevision": ANSWERS, "internvl": ANSWERS, "mistral3": ANSWERS,
       "idefics3": ANSWERS, "smolvlm": ANSWERS, "qwen2_vl": ("wood", "square"),
       "qwen2_5_vl": ("wood\n\nIt is wood", "square"), "qwen3_vl": ("wood\n\nIt is wood", "square"),
       "qwen3_vl_moe": ("wood\n\nIt is wood", "square"), "gemma3": ("wood\n\nIt is wood", "square")}


@pytest.mark.parametrize("name", SNAPSHOT_BENCHMARKS)
def test_stop_strings_are_lmms_evals(name):
    assert DATASETS.get(name).until == UNTIL[name]


@pytest.mark.parametrize("family", sorted(CUT))
def test_an_answer_is_cut_where_lmms_evals_wrapper_for_the_family_cuts_it(root, family):
    from research.combination import Combination
    from research.evaluation import CombinationModule
    from research.models import FAMILIES

    assert sorted(CUT) == FAMILIES.names()
    gqa, mmbench = DATASETS.get("gqa")(root=str(root)), DATASETS.get("mmbench")(root=str(root))
    adapter = FAMILIES.get(family)
    gqa_cut, mmbench_cut = (cut_at_stop(answer, adapter.stop_strings(dataset.until))
                            for answer, dataset in zip(ANSWERS, (gqa, mmbench)))
    assert (gqa_cut, mmbench_cut) == CUT[family]
    assert gqa.sample_score({"prediction": gqa_cut, "target": "wood"}) == float(gqa_cut == "wood")
    question = next(s for s in mmbench if s.id == "1")  # A. circle B. square C. triangle, answer B
    row = {"prediction": mmbench_cut, "answer": question.answer, "target": question.target}
    assert mmbench.sample_score(row) == float(mmbench_cut == "square")  # uncut: both options named, read as "A"

    class Stub:  # what CombinationModule reads of an adapter when it is built
        model = torch.nn.Linear(1, 1)
        stop_strings = adapter.stop_strings

    module = CombinationModule(Stub(), None, Combination("vanilla", "-", None), 16, 64, gqa.until)
    assert module.until == adapter.stop_strings(gqa.until)


def test_readme_holds_the_stop_string_table():
    from research.models.base import stop_string_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert stop_string_table() in readme


@pytest.mark.parametrize(("case", "message"), [
    ("no-root", "needs data.root=<folder holding MME/> or data.paths.mme="),
    ("missing-folder", "holds no MME/ snapshot for benchmark 'mme'"),
    ("missing-field", "has no field(s) ['category']; expected ['question_id', 'question', 'answer', 'category']"),
    ("unknown-split", "unknown split 'val' for benchmark 'mme'; choose one of ['test']"),
    ("no-shards", "no parquet shards for split 'test' (expected"),
])
def test_bad_snapshots_raise_one_line_naming_what_was_expected(tmp_path, case, message):
    from research.data.fixtures import mme

    kwargs = {"root": str(tmp_path)}
    if case == "no-root":
        kwargs = {}
    elif case != "missing-folder":
        directory = mme(tmp_path)
        if case == "missing-field":
            for file in (directory / "data").glob("*.parquet"):
                pq.write_table(pq.read_table(file).drop_columns(["category"]), file)
        elif case == "unknown-split":
            kwargs["split"] = "val"
        elif case == "no-shards":
            for file in (directory / "data").glob("*.parquet"):
                file.rename(file.with_name("other-" + file.name))
    with pytest.raises(SnapshotError) as error:
        DATASETS.get("mme")(**kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_truncated_image_is_skipped_and_counted(tmp_path):
    from research.data.fixtures import textvqa

    textvqa(tmp_path, broken=1)
    samples = list(DATASETS.get("textvqa")(root=str(tmp_path)))
    skipped: list[str] = []
    kept, images = decodable(samples, skipped)
    assert skipped == ["34603"] and [s.id for s in kept] == ["34602", "34604"] and len(images) == 2


def test_images_are_read_per_row_group_not_up_front(root):
    dataset = DATASETS.get("mme")(root=str(root))
    column = next(iter(dataset)).image.column
    assert not column._cache  # nothing read while loading the text fields
    for sample in dataset:
        sample.image.load()
    assert len(column._cache) <= column.cache_groups


def test_vqa_jsonl_reads_your_own_data(tmp_path):
    from research.data.fixtures import png

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png(0))
    lines = [
        {"id": "q1", "image": "img/a.png", "question": "How many dogs?", "answers": ["2", "two", "3"]},
        {"image": "img/a.png", "question": "What colour?", "answer": "Red"},
        {"image": "img/a.png", "question": "Which shape?", "choices": ["circle", "square"], "answer": "square"},
    ]
    file = tmp_path / "mine.jsonl"
    file.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    vqa = DATASETS.get("vqa_jsonl")(path=str(file))
    samples = list(vqa)
    assert [s.id for s in samples] == ["q1", "line-2", "line-3"]
    assert sample_image(samples[0]).size == (40, 32)
    assert samples[2].question == "Which shape?\nA. circle\nB. square\nAnswer with the option's letter from the " \
                                  "given choices directly."
    rows = [{"prediction": p, "answer": s.answer, "target": s.target} for p, s in zip(["2", "red.", "B"], samples)]
    # references "2", "two" -> "2", "3": leaving out either "2" leaves one match (1/3), leaving out "3" two (2/3)
    assert vqa.sample_score(rows[0]) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    assert vqa.sample_score(rows[2]) == 1.0
    exact = DATASETS.get("vqa_jsonl")(path=str(file), metric="exact_match")
    assert [exact.sample_score(r) for r in rows] == [1.0, 1.0, 1.0]
    with pytest.raises(SnapshotError, match="unknown vqa_jsonl metric 'bleu'"):
        DATASETS.get("vqa_jsonl")(path=str(file), metric="bleu")
    file.write_text(json.dumps({"image": "img/a.png", "answers": ["x"]}) + "\n")
    with pytest.raises(SnapshotError, match=r"mine.jsonl:1 lacks \['question'\]"):
        DATASETS.get("vqa_jsonl")(path=str(file))


WRITE_10000_ROWS = textwrap.dedent("""\
    import io, sys
    from pathlib import Path
    import pyarrow as pa
    from PIL import Image
    from research.data.fixtures import IMAGE, write_shards
    rows = 10_000
    encoded = io.BytesIO()
    Image.new("RGB", (448, 448), (120, 30, 200)).save(encoded, format="PNG")  # 588 KiB decoded, ~1.5 KiB encoded
    write_shards(Path(sys.argv[1]) / "textvqa", "data", "validation", {
        "question_id": (pa.int64(), list(range(rows))), "question": (pa.string(), ["what is this?"] * rows),
        "answers": (pa.list_(pa.string()), [["x"] * 10] * rows),
        "image": (IMAGE, [{"bytes": encoded.getvalue(), "path": f"{i}.png"} for i in range(rows)]),
    }, shards=4)
    """)
DECODE_EVERY_BATCH = textwrap.dedent("""\
    import resource, sys
    from research.data import DATASETS
    from research.data.images import decodable
    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    batch = 100
    samples = list(DATASETS.get("textvqa")(root=sys.argv[1]))  # as research.run does: text fields, image refs
    before = peak_mib()
    for start in range(0, len(samples), batch):  # as the predict loop does: decode a batch, drop it
        kept, images = decodable(samples[start : start + batch], [])
        assert len(images) == batch
        del kept, images
    print(len(samples), batch, round(before, 1), round(peak_mib(), 1))
    """)


@pytest.mark.slow
def test_a_10000_row_benchmark_holds_one_batch_of_decoded_images_at_a_time(tmp_path):
    """Peak RSS while decoding 10,000 images of 448x448 (588 KiB each, 5.6 GiB together) batch by batch grows
    by about one batch (100 images, 57 MiB), not by the benchmark."""
    subprocess.run([sys.executable, "-c", WRITE_10000_ROWS, str(tmp_path)], check=True, timeout=600)
    out = subprocess.run([sys.executable, "-c", DECODE_EVERY_BATCH, str(tmp_path)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    rows, batch, before, peak = out.stdout.split()
    one_batch, everything = (448 * 448 * 3 * n / 2**20 for n in (int(batch), int(rows)))
    print(f"peak RSS {before} MiB after loading the text fields, {peak} MiB after decoding all {rows} images in "
          f"batches of {batch} (one batch decoded = {one_batch:.0f} MiB; every image = {everything:.0f} MiB)")
    assert int(rows) == 10_000
    assert float(peak) - float(before) < 3 * one_batch
