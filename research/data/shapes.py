"""``shapes``: a seeded synthetic grounded-VQA benchmark of coloured shapes on a 3x3 grid, for a tiny LLaVA.

Images are 48x48 RGB, a 3x3 grid of 16x16-pixel cells; with ViT patch size 4 that is a 12x12 grid of 144
patches and each cell is a 4x4 block of patches. Every question carries the patches its answer depends on
(``relevant``), so a pruning method can be compared with an oracle. Rasterisation is integer numpy (no PIL
drawing, no anti-aliasing) and sample ``i`` of a split is drawn from ``np.random.default_rng([base_seed, i])``
through ``integers``/``random`` only, so every sample is bit-identical on every machine and can be made alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import numpy as np
from PIL import Image

from research.data import DATASETS

IMAGE_SIZE = 48
PATCH_SIZE = 4
GRID = 3
NUM_PATCHES = 144
CELL_SIZE = IMAGE_SIZE // GRID  # 16 px
PATCH_GRID = IMAGE_SIZE // PATCH_SIZE  # 12 patches a side
CELL_PATCHES = CELL_SIZE // PATCH_SIZE  # 4 patches a side
MIN_LABEL_PIXELS = 4  # a patch is labelled with an object if >= 4 of its 16 pixels are that object's
assert PATCH_GRID * PATCH_GRID == NUM_PATCHES

COLOURS = ["red", "green", "blue", "yellow", "purple", "cyan"]
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 240),
    "yellow": (240, 220, 40),
    "purple": (170, 60, 210),
    "cyan": (40, 220, 230),
}
BACKGROUND_RGB = (40, 40, 40)
BACKGROUND_NOISE = 8  # uniform integer noise in [-8, 8] per pixel and channel
SHAPES = ["circle", "square", "triangle", "cross"]
POSITIONS = ["top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right"]
NUMBERS = ["zero", "one", "two", "three", "four", "five"]
YES, NO, NOTHING = "yes", "no", "nothing"
MIN_OBJECTS, MAX_OBJECTS = 2, 5
MIN_SIZE, MAX_SIZE = 10, 14  # object bounding-box side in pixels

QTYPES = ("colour", "shape", "exist", "count", "position")
TEMPLATES = {
    "colour": "what color is the {shape} ?",
    "shape": "what shape is at the {position} ?",
    "exist": "is there a {colour} {shape} ?",
    "count": "how many {colour} shapes are there ?",
    "position": "where is the {colour} {shape} ?",
}
ANSWER_CHOICES: dict[str, list[str]] = {
    "colour": list(COLOURS),
    "shape": [*SHAPES, NOTHING],
    "exist": [YES, NO],
    "count": list(NUMBERS),
    "position": list(POSITIONS),
}
ANSWERS = sorted({answer for choices in ANSWER_CHOICES.values() for answer in choices})
_FILLERS = {"{shape}": SHAPES, "{colour}": COLOURS, "{position}": POSITIONS}
WORDS = sorted(
    {word for template in TEMPLATES.values() for word in template.split() if word not in _FILLERS}
    | {word for fillers in _FILLERS.values() for word in fillers}
    | set(ANSWERS)
)

P_EMPTY_CELL = 0.25  # "shape" questions about an empty cell (answer "nothing")
P_HARD_NEGATIVE = 0.85  # "exist"/no questions that pair a present colour with a present shape, when possible
P_COUNT_ZERO = 0.2  # "count" questions about an absent colour

SPLITS = ("train", "val", "test")
SPLIT_SEEDS = {"train": 1_001, "val": 2_002, "test": 3_003}
SPLIT_SIZES = {"train": 1_000_000, "val": 500, "test": 1_200}
TRAINING_SCENE_SEED = 4_004  # training_scene(): a stream disjoint from every split above

T = TypeVar("T")


def tokenize(text: str) -> list[str]:
    """Word-level tokens: split on spaces, with "?" always its own token."""
    return text.replace("?", " ? ").split()


def cell_patches(cell: int) -> np.ndarray:
    """bool [12, 12]: the 4x4 patches of grid cell ``cell`` (row-major, 0 = top-left)."""
    mask = np.zeros((PATCH_GRID, PATCH_GRID), dtype=bool)
    row, col = divmod(cell, GRID)
    mask[row * CELL_PATCHES : (row + 1) * CELL_PATCHES, col * CELL_PATCHES : (col + 1) * CELL_PATCHES] = True
    return mask


def _pick(rng: np.random.Generator, items: Sequence[T]) -> T:
    return items[int(rng.integers(len(items)))]


def _shuffled(rng: np.random.Generator, n: int) -> list[int]:
    """A Fisher-Yates permutation of range(n) from ``rng.integers`` only (stable across numpy versions)."""
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(i + 1))
        order[i], order[j] = order[j], order[i]
    return order


def _rasterise(shape: str, size: int) -> np.ndarray:
    """bool [size, size]: ``shape`` filling a size x size box, in exact integer arithmetic (2x = pixel centres)."""
    y, x = np.mgrid[0:size, 0:size]
    dx, dy = np.abs(2 * x + 1 - size), np.abs(2 * y + 1 - size)  # twice the distance to the box centre
    if shape == "circle":
        return dx**2 + dy**2 <= size**2
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "triangle":  # apex up: half-width grows linearly from the top row to the full base
        return dx <= y + 1
    if shape == "cross":  # a plus sign with arms a third of the box thick
        return (3 * dx <= size) | (3 * dy <= size)
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


class SceneObject(NamedTuple):
    cell: int  # 0..8, row-major
    colour: str
    shape: str

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass
class Scene:
    """One rendered image with its objects and per-patch labels."""

    image: np.ndarray  # [48, 48, 3] uint8
    objects: list[SceneObject]  # sorted by cell
    object_id: np.ndarray  # [48, 48] int64, -1 = background, else index into objects
    patch_colour: np.ndarray  # [12, 12] int64, 0 = background, else 1 + COLOURS index
    patch_shape: np.ndarray  # [12, 12] int64, 0 = background, else 1 + SHAPES index

    def object_patches(self, i: int) -> np.ndarray:
        """bool [12, 12]: the patches of object ``i``'s whole cell."""
        return cell_patches(self.objects[i].cell)

    def cells_mask(self, indices: Sequence[int]) -> np.ndarray:
        """bool [12, 12]: the union of the cells of objects ``indices``."""
        mask = np.zeros((PATCH_GRID, PATCH_GRID), dtype=bool)
        for i in indices:
            mask |= self.object_patches(i)
        return mask

    @property
    def objects_mask(self) -> np.ndarray:
        """bool [12, 12]: patches labelled with an object."""
        return self.patch_colour > 0

    def find(self, colour: str | None = None, shape: str | None = None) -> list[int]:
        """Indices of the objects with this colour and/or shape."""
        return [
            i
            for i, obj in enumerate(self.objects)
            if (colour is None or obj.colour == colour) and (shape is None or obj.shape == shape)
        ]


def make_scene(rng: np.random.Generator) -> Scene:
    """2..5 objects of random colour and shape in distinct random cells, on a noisy dark-grey background."""
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    cells = sorted(_shuffled(rng, GRID * GRID)[:n])
    noise = rng.integers(-BACKGROUND_NOISE, BACKGROUND_NOISE + 1, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    image = (np.asarray(BACKGROUND_RGB, dtype=np.int64) + noise).clip(0, 255).astype(np.uint8)
    object_id = np.full((IMAGE_SIZE, IMAGE_SIZE), -1, dtype=np.int64)
    objects: list[SceneObject] = []
    for i, cell in enumerate(cells):
        colour, shape = _pick(rng, COLOURS), _pick(rng, SHAPES)
        size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
        # offset inside the cell, keeping a 1-pixel margin so neighbouring objects never touch
        top, left = (int(v) for v in rng.integers(1, CELL_SIZE - size, size=2))
        row, col = divmod(cell, GRID)
        y0, x0 = row * CELL_SIZE + top, col * CELL_SIZE + left
        mask = _rasterise(shape, size)
        image[y0 : y0 + size, x0 : x0 + size][mask] = COLOUR_RGB[colour]
        object_id[y0 : y0 + size, x0 : x0 + size][mask] = i
        objects.append(SceneObject(cell, colour, shape))

    # each patch lies in one cell, so all its object pixels belong to that cell's (single) object
    pixels = (object_id >= 0).reshape(PATCH_GRID, PATCH_SIZE, PATCH_GRID, PATCH_SIZE).sum(axis=(1, 3))  # [12, 12]
    cell_colour = np.zeros((GRID, GRID), dtype=np.int64)
    cell_shape = np.zeros((GRID, GRID), dtype=np.int64)
    for obj in objects:
        cell_colour[divmod(obj.cell, GRID)] = 1 + COLOURS.index(obj.colour)
        cell_shape[divmod(obj.cell, GRID)] = 1 + SHAPES.index(obj.shape)
    labelled = pixels >= MIN_LABEL_PIXELS
    block = np.ones((CELL_PATCHES, CELL_PATCHES), dtype=np.int64)
    patch_colour = np.kron(cell_colour, block) * labelled
    patch_shape = np.kron(cell_shape, block) * labelled
    return Scene(image, objects, object_id, patch_colour, patch_shape)


@dataclass
class Question:
    qtype: str
    text: str
    answer: str  # one word of ANSWERS
    relevant: np.ndarray  # [12, 12] bool: the cells the answer depends on
    refs: tuple[int, ...]  # the objects behind ``relevant`` (empty for an empty-cell "shape" question)


def _all_objects(scene: Scene, qtype: str, text: str, answer: str) -> Question:
    """A negative answer depends on every object: it is checked against all of them."""
    refs = tuple(range(len(scene.objects)))
    return Question(qtype, text, answer, scene.cells_mask(refs), refs)


def _refers(scene: Scene, qtype: str, text: str, answer: str, refs: Sequence[int]) -> Question:
    return Question(qtype, text, answer, scene.cells_mask(refs), tuple(refs))


def _ask_colour(scene: Scene, rng: np.random.Generator) -> Question | None:
    shapes = Counter(obj.shape for obj in scene.objects)
    unique = [i for i, obj in enumerate(scene.objects) if shapes[obj.shape] == 1]
    if not unique:
        return None
    i = _pick(rng, unique)
    obj = scene.objects[i]
    return _refers(scene, "colour", TEMPLATES["colour"].format(shape=obj.shape), obj.colour, [i])


def _ask_shape(scene: Scene, rng: np.random.Generator) -> Question | None:
    occupied = {obj.cell for obj in scene.objects}
    empty = [cell for cell in range(GRID * GRID) if cell not in occupied]
    if rng.random() < P_EMPTY_CELL and empty:
        cell = _pick(rng, empty)
        text = TEMPLATES["shape"].format(position=POSITIONS[cell])
        return Question("shape", text, NOTHING, cell_patches(cell), ())
    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    return _refers(scene, "shape", TEMPLATES["shape"].format(position=obj.position), obj.shape, [i])


def _ask_exist(scene: Scene, rng: np.random.Generator) -> Question | None:
    if rng.random() < 0.5:
        obj = _pick(rng, scene.objects)
        text = TEMPLATES["exist"].format(colour=obj.colour, shape=obj.shape)
        return _refers(scene, "exist", text, YES, scene.find(obj.colour, obj.shape))
    present = {(obj.colour, obj.shape) for obj in scene.objects}
    colours = {obj.colour for obj in scene.objects}
    shapes = {obj.shape for obj in scene.objects}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    hard = [(c, s) for c, s in absent if c in colours and s in shapes]
    easy = [(c, s) for c, s in absent if c not in colours or s not in shapes]  # never empty: <= 5 of 6 colours
    colour, shape = _pick(rng, hard if hard and rng.random() < P_HARD_NEGATIVE else easy)
    return _all_objects(scene, "exist", TEMPLATES["exist"].format(colour=colour, shape=shape), NO)


def _ask_count(scene: Scene, rng: np.random.Generator) -> Question | None:
    counts = Counter(obj.colour for obj in scene.objects)
    absent = [c for c in COLOURS if counts[c] == 0]  # never empty: <= 5 objects
    if rng.random() < P_COUNT_ZERO:
        colour = _pick(rng, absent)
        return _all_objects(scene, "count", TEMPLATES["count"].format(colour=colour), NUMBERS[0])
    # a present colour with probability ~ count^2, so that counts above one are not rare
    present = [c for c in COLOURS if counts[c] > 0]
    cumulative = np.cumsum([counts[c] ** 2 for c in present])
    colour = present[int(np.searchsorted(cumulative, int(rng.integers(cumulative[-1])), side="right"))]
    refs = scene.find(colour=colour)
    return _refers(scene, "count", TEMPLATES["count"].format(colour=colour), NUMBERS[len(refs)], refs)


def _ask_position(scene: Scene, rng: np.random.Generator) -> Question | None:
    pairs = Counter((obj.colour, obj.shape) for obj in scene.objects)
    unique = [i for i, obj in enumerate(scene.objects) if pairs[obj.colour, obj.shape] == 1]
    if not unique:
        return None
    i = _pick(rng, unique)
    obj = scene.objects[i]
    text = TEMPLATES["position"].format(colour=obj.colour, shape=obj.shape)
    return _refers(scene, "position", text, obj.position, [i])


_ASKERS = {
    "colour": _ask_colour,
    "shape": _ask_shape,
    "exist": _ask_exist,
    "count": _ask_count,
    "position": _ask_position,
}


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> Question | None:
    """A question of type ``qtype`` about ``scene``, or None if this scene cannot support one."""
    if qtype not in _ASKERS:
        raise ValueError(f"unknown question type {qtype!r}; choose one of {list(QTYPES)}")
    return _ASKERS[qtype](scene, rng)


@dataclass
class Sample:
    id: str  # "<split>-<index:06d>"
    image: np.ndarray  # [48, 48, 3] uint8
    question: str
    answer: str
    qtype: str
    relevant: np.ndarray  # [12, 12] bool
    patch_colour: np.ndarray  # [12, 12] int64, 0 = background, else 1 + COLOURS index
    patch_shape: np.ndarray  # [12, 12] int64, 0 = background, else 1 + SHAPES index
    objects: list[SceneObject]

    @property
    def objects_mask(self) -> np.ndarray:
        """bool [12, 12]: patches labelled with an object."""
        return self.patch_colour > 0


def _check_split(split: str) -> None:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")


def make_sample(split: str, index: int) -> Sample:
    """Sample ``index`` of ``split``, made independently from ``default_rng([split seed, index])``.

    Question types cycle over QTYPES with the index; a scene that cannot support the type is redrawn.
    """
    _check_split(split)
    if index < 0:
        raise IndexError(f"sample index must be >= 0, got {index}")
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    qtype = QTYPES[index % len(QTYPES)]
    while True:
        scene = make_scene(rng)
        question = ask(scene, qtype, rng)
        if question is not None:
            break
    return Sample(
        id=f"{split}-{index:06d}",
        image=scene.image,
        question=question.text,
        answer=question.answer,
        qtype=qtype,
        relevant=question.relevant,
        patch_colour=scene.patch_colour,
        patch_shape=scene.patch_shape,
        objects=scene.objects,
    )


@DATASETS.register("shapes")
class ShapesVQA:
    """The ``shapes`` benchmark: "train" (1,000,000 by default, any size), "val" (500) and "test" (1,200).

    Samples are made on demand; ``size`` takes a prefix of the split (train: any length).
    """

    def __init__(self, split: str = "test", size: int | None = None) -> None:
        _check_split(split)
        full = SPLIT_SIZES[split]
        size = full if size is None else size
        if size < 0 or (split != "train" and size > full):
            raise ValueError(f"size of split {split!r} must be in [0, {full}], got {size}")
        self.split = split
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Sample:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        return make_sample(self.split, index)

    @staticmethod
    def chance_accuracy(samples: list[Sample]) -> float | None:
        """Accuracy of answering uniformly at random among each question type's answers (``ANSWER_CHOICES``)."""
        return sum(1.0 / len(ANSWER_CHOICES[s.qtype]) for s in samples) / len(samples) if samples else None

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(self.size))

    @staticmethod
    def pil_image(sample: Sample) -> Image.Image:
        return Image.fromarray(sample.image)

    def __repr__(self) -> str:
        return f"ShapesVQA(split={self.split!r}, size={self.size})"


def training_scene(index: int, seed: int = 0, num_questions: int = 3) -> tuple[Scene, list[Question]]:
    """One scene and up to ``num_questions`` distinct questions (distinct types while possible) for multi-turn
    training, from ``default_rng([TRAINING_SCENE_SEED, seed, index])``, a stream disjoint from the splits."""
    rng = np.random.default_rng([TRAINING_SCENE_SEED, seed, index])
    scene = make_scene(rng)
    qtypes = [QTYPES[i] for i in _shuffled(rng, len(QTYPES))]
    questions: list[Question] = []
    texts: set[str] = set()
    for attempt in range(4 * num_questions + 2 * len(QTYPES)):
        if len(questions) == num_questions:
            break
        question = ask(scene, qtypes[attempt % len(qtypes)], rng)
        if question is not None and question.text not in texts:
            questions.append(question)
            texts.add(question.text)
    return scene, questions


CAPTION = "the {colour} {shape} is at the {position}"  # one clause per object, in the benchmark's own words


def caption(scene: Scene) -> str:
    """A scene description naming every object's colour, shape and position, in cell order (row-major).

    Its words are the benchmark's (``WORDS``), so the tokenizer is unchanged; each word after "the" is
    predictable only from the image region of the object it describes."""
    return " ".join(
        CAPTION.format(colour=obj.colour, shape=obj.shape, position=obj.position) for obj in scene.objects
    )


def _budget(fraction: float) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return round(fraction * NUM_PATCHES)


def oracle_keep(
    relevant: np.ndarray, objects_mask: np.ndarray, fraction: float, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Sorted flat (row-major) indices of the round(fraction * 144) patches an oracle keeps.

    Priority: relevant object patches, other relevant patches, other object patches, background. Ties within
    the tier that straddles the budget are broken by ``rng`` if given, else in row-major order.
    """
    k = _budget(fraction)
    rel = np.asarray(relevant, dtype=bool).reshape(-1)  # [144]
    obj = np.asarray(objects_mask, dtype=bool).reshape(-1)  # [144]
    order: list[np.ndarray] = []
    for tier in (rel & obj, rel & ~obj, ~rel & obj, ~rel & ~obj):
        idx = np.flatnonzero(tier)
        order.append(idx if rng is None else rng.permutation(idx))
    return np.sort(np.concatenate(order)[:k]).astype(np.int64)


def random_keep(fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted flat indices of round(fraction * 144) patches chosen uniformly at random."""
    return np.sort(rng.permutation(NUM_PATCHES)[: _budget(fraction)]).astype(np.int64)


def normalize_answer(text: str) -> str:
    """The first word, stripped and lowercased, without surrounding punctuation."""
    words = text.strip().lower().split()
    return words[0].strip(".,;:!?\"'") if words else ""


def accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of predictions whose normalised first word equals the normalised answer."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("accuracy of an empty set of predictions")
    hits = sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers))
    return hits / len(answers)
