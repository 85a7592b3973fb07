"""Typed run configuration: dataclasses merged with OmegaConf (experiment YAML, then ``key=value``).

``experiment=NAME`` loads ``experiments/NAME.yaml`` (which may name one ``base:`` experiment to
inherit from); command-line ``key=value`` pairs override it. Every name and value is validated
here, before any model loads, and a bad one raises :class:`ConfigError` with one line naming the
bad value and the valid choices.
"""

from __future__ import annotations

import importlib
import importlib.util
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from research.specs import ConfigError, parse_reference, parse_schedules, parse_scorers

__all__ = ["ConfigError", "RunConfig", "load_config", "dataset_names", "experiment_names"]

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
DTYPES = ("float32", "float16", "bfloat16")
ATTENTION = ("sdpa", "eager")
ANALYSES = ("text_dynamics", "attention_shifts")  # research.analysis.collect runs them
INTERVALS = ("BCa", "percentile", "basic")  # eval.interval: scipy.stats.bootstrap's methods
DEVICE_MAPS = ("auto", "balanced", "sequential")  # model.device_map: accelerate's sharding (optional extra)


@dataclass
class ModelConfig:
    name: str = "shapes"  # a registered model: shapes (shipped offline default) or llava15 (needs path)
    path: str | None = None  # local checkpoint directory
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    device_map: str | None = None  # auto: shard a checkpoint over the devices (accelerate, as transformers loads it)


@dataclass
class DataConfig:
    # a registered dataset, or a list of them: every combination runs on each (summary in the Table-1 layout)
    name: Any = "shapes"
    split: str | None = None  # None: each dataset's own evaluated split (shapes: test; textvqa: validation; ...)
    limit: int | None = None  # first N samples of the split (None: all)
    calibration_split: str | None = None  # where changepoint calibrates (None: val, or train when val is evaluated)
    root: str | None = None  # folder holding the lmms-lab snapshots (MME/, GQA/, MMBench/, ScienceQA/, textvqa/, ...)
    paths: dict[str, str] = field(default_factory=dict)  # a snapshot folder (or file) per benchmark, overriding root
    options: dict[str, Any] = field(default_factory=dict)  # per benchmark: {post_prompt: ..., metric: ...}


@dataclass
class EvalConfig:
    batch_size: int = 100
    max_new_tokens: int | None = None  # greedy answer length; None: the dataset's own (lmms-eval's; shapes 3)
    latency_samples: int = 12  # batch-1 prefills timed per combination, after warm-up
    decode_tokens: int = 8  # tokens generated to time decoding
    overlays: int = 3  # fixed images whose kept tokens are drawn per combination
    analysis_samples: int = 64  # samples whose attention dynamics each combination logs (0: none)
    bootstrap: int = 9999  # paired bootstrap resamples of every interval (0: no intervals or tests)
    confidence: float = 0.95  # the intervals' level; a difference is significant at 1 - confidence (Holm)
    interval: str = "BCa"  # scipy.stats.bootstrap's method: BCa | percentile | basic


@dataclass
class TrainerConfig:
    devices: int = 1  # data-parallel processes (DDP; gloo on CPU): each combination's samples split across them
    accelerator: str = "auto"  # Lightning's: auto | cpu | gpu
    # machines, each running `devices` processes (Lightning's multi-node DDP, started by torchrun or SLURM);
    # null: the launcher's count (1 without one)
    num_nodes: int | None = None


@dataclass
class RunConfig:
    """One experiment: every scorer x schedule x budget, plus the vanilla reference."""

    experiment: str = "ablation_locations"
    analysis: str | None = None  # text_dynamics | attention_shifts: an attention analysis instead of a sweep
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # entries: a registry name, or a mapping {name: ..., <its parameters>}; a scorer's mapping may also
    # carry its own protocol, overriding the experiment's: schedules: [...] and positions: original|compact
    scorers: list[Any] = field(default_factory=lambda: ["text_prior"])
    schedules: list[Any] = field(default_factory=lambda: [{"name": "layers", "layers": [1, 10, 20], "scale_from": 32}])
    budgets: list[float] = field(default_factory=lambda: [32.0])  # average retained vision tokens
    counting: str = "post"  # budget convention: post (papers': a pruning layer at its post-pruning size) | pre
    positions: str = "original"  # original | compact (renumber kept tokens)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # the combination each one is tested against besides vanilla, at its budget (and schedule / scorer where the
    # reference does not name them): a scorer name or label, or {scorer: ..., schedule: ..., budget: ...};
    # null: `random` at the same schedule and budget when the sweep has it
    reference: Any = None
    seed: int = 0
    verbose: bool = False  # library output too (Lightning's notices, the weights-loading bar)
    output_dir: str = "runs"
    imports: list[str] = field(default_factory=list)  # user modules that register scorers / schedules


def experiment_names() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))


def _experiment_file(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = EXPERIMENTS / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown experiment {name!r}; choose one of {experiment_names()} (or a path to a .yaml)")
    return path


def _read_experiment(path: Path) -> DictConfig:
    """An experiment file as a mapping; malformed YAML or another top level is one ConfigError line."""
    try:
        node = OmegaConf.load(path)
    except Exception as error:  # yaml.YAMLError and OmegaConf's own errors: the message names line and column
        first = " ".join(str(error).split())
        raise ConfigError(f"experiment file {path} is not valid YAML: {first}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"experiment file {path} must hold a mapping of config keys, got a {type(node).__name__}")
    return node


def _load_experiment(name: str) -> DictConfig:
    node = _read_experiment(_experiment_file(name))
    base = node.pop("base", None)
    if base is None:
        return node
    parent = _read_experiment(_experiment_file(base))
    if "base" in parent:
        raise ConfigError(f"experiment {name!r}: base {base!r} has a base of its own; one level of inheritance only")
    return OmegaConf.merge(parent, node)


def _one_line(error: OmegaConfBaseException, schema: Any) -> str:
    message = str(error).splitlines()[0]
    key = getattr(error, "full_key", None)
    if "not in struct" in message or ("Key '" in message and "not" in message):
        parent = key.rsplit(".", 1)[0] if key and "." in key else ""
        node = OmegaConf.select(schema, parent) if parent else schema
        valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
        return f"unknown config key {key!r}; valid keys{f' under {parent!r}' if parent else ''}: {valid}"
    return f"bad config value for {key!r}: {message}" if key else message


def load_config(argv: list[str]) -> RunConfig:
    """Parse ``key=value`` arguments (``experiment=NAME`` first picks the YAML) into a validated RunConfig."""
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ConfigError(f"arguments must be key=value, got {bad}; e.g. experiment=ablation_locations budgets=[16]")
    # ``model=NAME`` is shorthand for ``model.name=NAME`` (whatever order ``model.path=...`` comes in)
    argv = [f"model.name={a.split('=', 1)[1]}" if a.split("=", 1)[0] == "model" else a for a in argv]
    cli = OmegaConf.from_dotlist(argv)
    name = cli.get("experiment", RunConfig.experiment)
    schema = OmegaConf.structured(RunConfig)
    try:
        merged = OmegaConf.merge(schema, _load_experiment(name), cli)
        merged.experiment = Path(str(name)).stem
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as error:
        raise ConfigError(_one_line(error, schema)) from None
    import_user_modules(cfg.imports)
    validate(cfg)
    return cfg


def import_user_modules(modules: list[str]) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(f"imports: cannot import {module!r} ({error})") from None


def validate(cfg: RunConfig) -> None:
    """Check every name and value that can be checked without loading weights."""
    from research.data import DATASETS
    from research.models import MODELS
    from research.pruning.plan import POSITION_MODES
    from schedules import COUNTING

    choices = {"counting": (cfg.counting, COUNTING), "positions": (cfg.positions, POSITION_MODES),
               "model.dtype": (cfg.model.dtype, DTYPES),
               "model.attn_implementation": (cfg.model.attn_implementation, ATTENTION),
               "trainer.accelerator": (cfg.trainer.accelerator, ("auto", "cpu", "gpu", "cuda"))}
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"unknown {key} {value!r}; choose one of {list(valid)}")
    parse_scorers(cfg.scorers, cfg.positions, POSITION_MODES)
    parse_schedules(cfg.schedules)
    names = dataset_names(cfg)
    for registry, name in [(MODELS, cfg.model.name)] + [(DATASETS, name) for name in names]:
        if name not in registry:
            raise ConfigError(registry.unknown_message(name))
    if cfg.analysis is not None and len(names) > 1:
        raise ConfigError(f"analysis {cfg.analysis!r} runs on one dataset; got data.name={names}")
    unknown = sorted(set(cfg.data.paths) - set(names))
    if unknown:
        raise ConfigError(f"data.paths names {unknown}, not among data.name {names}")
    _check_devices(cfg)
    _check_statistics(cfg)
    if cfg.analysis is not None and cfg.analysis not in ANALYSES:
        raise ConfigError(f"unknown analysis {cfg.analysis!r}; choose one of {list(ANALYSES)}")
    for key, items in (("budgets", cfg.budgets), ("scorers", cfg.scorers), ("schedules", cfg.schedules)):
        if not items and cfg.analysis is None:
            raise ConfigError(f"{key} is empty; give at least one (e.g. {key}={DEFAULT_EXAMPLES[key]})")
    lowest_values = (("eval.batch_size", cfg.eval.batch_size, 1), ("data.limit", cfg.data.limit, 1),
                     ("eval.max_new_tokens", cfg.eval.max_new_tokens, 1),
                     ("eval.latency_samples", cfg.eval.latency_samples, 0),
                     ("eval.decode_tokens", cfg.eval.decode_tokens, 1), ("eval.overlays", cfg.eval.overlays, 0),
                     ("eval.analysis_samples", cfg.eval.analysis_samples, 0),
                     ("trainer.devices", cfg.trainer.devices, 1), ("trainer.num_nodes", cfg.trainer.num_nodes, 1))
    for key, value, lowest in lowest_values:
        if value is not None and value < lowest:
            raise ConfigError(f"{key}={value} out of range; valid: an integer >= {lowest}"
                              + (" (or null for the whole split)" if key == "data.limit" else ""))
    check_writable(Path(cfg.output_dir))


def dataset_names(cfg: RunConfig) -> list[str]:
    """``data.name`` as a list (one name, or the benchmarks of a multi-benchmark sweep)."""
    names = cfg.data.name
    if isinstance(names, str):
        return [names]
    names = list(names)
    if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"data.name must be a dataset name or a non-empty list of distinct names, got {names}")
    return names


def _check_devices(cfg: RunConfig) -> None:
    """``model.device_map`` (a name accelerate knows, accelerate installed) and ``trainer.devices`` together."""
    device_map = cfg.model.device_map
    if device_map is None:
        return
    if device_map not in DEVICE_MAPS:
        raise ConfigError(f"unknown model.device_map {device_map!r}; choose one of {list(DEVICE_MAPS)} (or null)")
    if importlib.util.find_spec("accelerate") is None:
        raise ConfigError(f"model.device_map={device_map} needs accelerate: pip install -e '.[sharding]'")
    if cfg.trainer.devices > 1:
        raise ConfigError(f"model.device_map={device_map} shards one model over the devices; it does not combine "
                          f"with trainer.devices={cfg.trainer.devices} (data-parallel copies): choose one")


def _check_statistics(cfg: RunConfig) -> None:
    """``eval.bootstrap`` / ``confidence`` / ``interval`` and the shape of ``reference``."""
    if cfg.eval.bootstrap < 0:
        raise ConfigError(f"eval.bootstrap={cfg.eval.bootstrap} out of range; valid: 0 (no statistics) or the "
                          "number of resamples, e.g. 9999")
    if not 0 < cfg.eval.confidence < 1:
        raise ConfigError(f"eval.confidence={cfg.eval.confidence} out of range; valid: a level in (0, 1), e.g. 0.95")
    if cfg.eval.interval not in INTERVALS:
        raise ConfigError(f"unknown eval.interval {cfg.eval.interval!r}; choose one of {list(INTERVALS)}")
    parse_reference(cfg.reference)


DEFAULT_EXAMPLES = {"budgets": "[64]", "scorers": "[text_prior]", "schedules": "[{name: layers, layers: [1, 10, 20]}]"}


def check_writable(directory: Path) -> None:
    """Refuse an ``output_dir`` that cannot be created or written, without creating it."""
    existing = directory.absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as error:
        raise ConfigError(f"output_dir {str(directory)!r} cannot be written ({error.strerror or error}); "
                          "choose a writable directory") from None
