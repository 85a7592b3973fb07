"""The resolved experiment: a :class:`RunConfig` made, once, into what the sweep runs.

:func:`resolve` parses every scorer and schedule entry into its spec, inspects the checkpoint (family, decoder
layers, image tokens; config.json only, no weights) and checks that the family can run every scorer, names the
datasets and the split a changepoint entry calibrates on, and finds the calibrations already cached. Everything
after it (tasks, calibration, the plan, fingerprints, the predict loops) reads the :class:`Experiment`, never the
raw configuration. A bad value is one :class:`ConfigError` line, before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from research.config import EvalConfig, ModelConfig, RunConfig, TrainerConfig, dataset_names
from research.specs import ConfigError, ScheduleSpec, ScorerSpec, parse_reference, parse_schedules, parse_scorers
from research.storage import read_json


@dataclass(frozen=True)
class ModelSpec:
    """The model: its settings and what its checkpoint's config.json says (family, decoder layers, image tokens)."""

    settings: ModelConfig  # as configured (name, path, dtype, attention, device_map): part of every fingerprint
    directory: Path | None  # the local checkpoint; None: planned for a shape alone (nothing to load)
    adapter: Any  # the family's VLMAdapter subclass (None with no checkpoint)
    num_layers: int
    num_vision: int  # image tokens a budget is planned against (the fixed count, or the family's nominal one)

    @property
    def name(self) -> str:
        return self.settings.name

    @classmethod
    def of_shape(cls, settings: ModelConfig, num_layers: int, num_vision: int) -> ModelSpec:
        """A model known by its shape alone: plans and fingerprints without a checkpoint (nothing to load)."""
        return cls(settings, None, None, num_layers, num_vision)

    def load(self) -> tuple[Any, Any]:
        """(adapter, processor): the weights on the GPU when there is one, or sharded by ``device_map``."""
        import torch

        if self.directory is None:
            raise ConfigError(f"model {self.name!r} was planned for a shape alone; give model.path to run it")
        dtype = getattr(torch, self.settings.dtype)
        if self.settings.device_map is not None:
            from research.distributed import load_sharded

            return load_sharded(self.adapter, self.directory, dtype, self.settings.attn_implementation,
                                self.settings.device_map)
        return self.adapter.from_pretrained(self.directory, dtype=dtype,
                                            attn_implementation=self.settings.attn_implementation,
                                            device="cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class DataSpec:
    """The datasets of the sweep and where they are read from."""

    names: tuple[str, ...]
    per_benchmark: bool  # data.name is a list: results, predictions and runs go in a folder per benchmark
    split: str | None  # None: each dataset's own evaluated split
    limit: int | None
    calibration_split: str  # where a changepoint entry calibrates: never the evaluated split unless asked
    settings: dict[str, Any]  # name, split, limit, calibration_split as configured (part of every fingerprint)
    root: str | None = None
    paths: dict[str, str] = field(default_factory=dict)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Calibration:
    """A changepoint entry that derives its layers from the model's attention shifts on ``schedule``'s samples."""

    schedule: ScheduleSpec
    cache_file: Path | None  # its histogram's cache (per model, dataset, split and N); None: no checkpoint
    cache: Any  # what that file held when the experiment was resolved (None: nothing readable)

    @property
    def samples(self) -> int:
        return int(self.schedule.calibration_samples or 0)

    @property
    def cached(self) -> list[int] | None:
        """The histogram cached for this entry, if any."""
        histogram = self.cache.get("histogram") if isinstance(self.cache, dict) else None
        return histogram if isinstance(histogram, list) else None


@dataclass(frozen=True)
class Experiment:
    """One experiment, resolved: every scorer x schedule x budget on every dataset, plus the vanilla reference."""

    name: str
    analysis: str | None  # text_dynamics | attention_shifts: an attention analysis instead of a sweep
    model: ModelSpec
    data: DataSpec
    scorers: tuple[ScorerSpec, ...]
    schedules: tuple[ScheduleSpec, ...]
    budgets: tuple[float, ...]
    counting: str
    positions: str
    eval: EvalConfig
    trainer: TrainerConfig
    seed: int
    output_dir: Path  # <output_dir>/<experiment>
    cache_dir: Path  # <output_dir>/.cache, shared by the experiments of one output_dir
    calibrations: tuple[Calibration, ...]
    config_yaml: str  # the configuration as given, written beside the results
    reference: Any = None  # research.sweep.ReferenceSpec: what each combination is tested against besides vanilla


def resolve(cfg: RunConfig, model: ModelSpec | None = None) -> Experiment:
    """``cfg`` (validated by :func:`research.config.load_config`) resolved; ``model`` given instead of inspecting
    ``cfg.model``'s checkpoint plans for a shape alone (:meth:`ModelSpec.of_shape`)."""
    from research.models.registry import check_scorers, inspect_checkpoint
    from research.pruning.plan import POSITION_MODES

    names = tuple(dataset_names(cfg))
    scorers = parse_scorers(cfg.scorers, cfg.positions, POSITION_MODES)
    schedules = parse_schedules(cfg.schedules)
    calibration_split = cfg.data.calibration_split or ("train" if cfg.data.split == "val" else "val")
    cache_dir = Path(cfg.output_dir) / ".cache"
    calibrations: tuple[Calibration, ...] = tuple(Calibration(s, None, None) for s in schedules if s.calibrates)
    if model is None:
        try:
            checkpoint = inspect_checkpoint(cfg.model.name, cfg.model.path)  # config.json only, no weights
            check_scorers(checkpoint.adapter, scorers)
        except ValueError as error:  # models.UnsupportedModel, or model.path missing: one line
            raise ConfigError(str(error)) from None
        model = ModelSpec(cfg.model, checkpoint.directory, checkpoint.adapter, checkpoint.layout.num_layers,
                          checkpoint.layout.nominal_tokens)
        files = [cache_dir / f"attention_shifts-{checkpoint.cache_key(names[0], calibration_split, str(c.samples))}"
                 ".json" for c in calibrations]  # per model, dataset, split and N
        calibrations = tuple(Calibration(c.schedule, path, read_json(path, "calibration cache"))
                             for c, path in zip(calibrations, files))
    data = DataSpec(
        names=names, per_benchmark=not isinstance(cfg.data.name, str), split=cfg.data.split, limit=cfg.data.limit,
        calibration_split=calibration_split,
        settings={"name": names[0], "split": cfg.data.split or "test", "limit": cfg.data.limit,
                  "calibration_split": cfg.data.calibration_split},
        root=cfg.data.root, paths=dict(cfg.data.paths), options={k: dict(v or {}) for k, v in cfg.data.options.items()},
    )
    return Experiment(
        name=cfg.experiment, analysis=cfg.analysis, model=model, data=data, scorers=scorers, schedules=schedules,
        budgets=tuple(float(b) for b in cfg.budgets), counting=cfg.counting, positions=cfg.positions, eval=cfg.eval,
        trainer=cfg.trainer, seed=cfg.seed, output_dir=Path(cfg.output_dir) / cfg.experiment, cache_dir=cache_dir,
        calibrations=calibrations, config_yaml=OmegaConf.to_yaml(OmegaConf.structured(cfg)),
        reference=parse_reference(cfg.reference),
    )

