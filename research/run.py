"""``python -m research.run experiment=NAME key=value ...``: every combination of an experiment.

``main(argv)`` only parses; ``run(cfg)`` does the work (and is what tests call). Results go to
``<output_dir>/<experiment>/``: ``summary.csv``, ``summary.md``, ``config.yaml``, ``predictions/``
(JSONL per combination), ``results/`` (JSON per combination: what a re-run reuses) and
``tensorboard/`` (one run per combination, named by its label (research.report.labels), plus ``summary``;
``tensorboard --logdir runs/<experiment>/tensorboard``).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from omegaconf import OmegaConf

from research.config import ConfigError, RunConfig, load_config
from research.distributed import is_rank_zero, watch_rank_zero
from research.execution import Sweep
from research.experiment import resolve
from research.output import SweepOutput
from research.report.summary import compact_table
from research.stopping import StopSignal, finished_line, stop_on_signals
from research.storage import StopSweep
from research.sweep import plan_sweep
from research.tasks import chance_accuracy, open_tasks


def run(cfg: RunConfig) -> list[dict]:
    """Run (or resume) every combination on every dataset; return the summary rows (vanilla first)."""
    watch_rank_zero()  # in a copy started for trainer.devices > 1: stop with one line if rank 0 dies
    experiment = resolve(cfg)  # every entry parsed, the checkpoint inspected, the cached calibrations found
    plan_sweep(experiment, {c.schedule.index: c.cached for c in experiment.calibrations if c.cached},
               allow_pending=True)  # every budget solved before the model loads
    output = SweepOutput.of(experiment)  # only rank 0 writes (research.output)
    # The lock comes before the data and the model load, so a second run into this directory is told at once.
    with output.locked():
        tasks = open_tasks(experiment)
        sweep = Sweep(experiment, output, tasks)
        rows = sweep.run()
        if experiment.analysis is None:  # the summary run, every time (also resumed, also several benchmarks)
            task = tasks[0]
            try:
                output.log_summary_run(rows, sweep.combos, sweep.results, {t.name: t.folder for t in tasks},
                                       len(task.samples), chance_accuracy(task.dataset, task.samples))
            except StopSignal as stop:
                raise StopSignal(stop.signum, finished_line(rows, output.directory)) from None
        return rows


def quiet_lightning(verbose: bool = False) -> None:
    """Keep the terminal for the progress bars: no device banners, tips, "Received SIGTERM" (the stop's own line
    says it), known deprecation noise or the weights-loading bar, unless ``verbose`` (``verbose=true``)."""
    if verbose:
        return
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric",
                 "lightning.pytorch.trainer.connectors.signal_connector"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", ".*litlogger.*")
    warnings.filterwarnings("ignore", ".*predict returned None.*")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" of every model load


def usage() -> str:
    """``--help``: the command, the experiments and every config key with its default."""
    from research.config import experiment_names

    keys = OmegaConf.to_yaml(OmegaConf.structured(RunConfig)).rstrip()
    return "\n".join([
        "usage: python -m research.run experiment=NAME [key=value ...]",
        "",
        "Runs every scorer x schedule x budget of experiments/NAME.yaml (plus vanilla) and writes",
        "<output_dir>/<experiment>/ (summary, predictions, results, tensorboard). Re-running resumes.",
        "",
        f"experiments: {', '.join(experiment_names())}",
        "",
        "config keys (defaults; an experiment file sets some, key=value overrides):",
        keys,
    ])


def main(argv: list[str] | None = None) -> int:
    """Parse ``key=value`` arguments and run; a bad value exits 2 with one line, before any model loads.

    With ``trainer.devices`` > 1 the copies Lightning starts (ranks 1..N-1) print nothing and exit 0 once the
    sweep is done (rank 0 reports; a rank exiting non-zero makes Lightning kill the others)."""
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help", "help"} & set(argv):
        print(usage())
        return 0
    try:
        with stop_on_signals():  # SIGTERM, SIGINT: stop at once, keep what finished (research.stopping)
            cfg = load_config(argv)
            quiet_lightning(cfg.verbose)
            rows = run(cfg)  # validates everything before any model loads
    except StopSignal as stop:
        if is_rank_zero():
            print(stop.line(), file=sys.stderr, flush=True)
        return stop.exit_code if is_rank_zero() else 0
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StopSweep as error:
        if not is_rank_zero():
            return 0
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not is_rank_zero():
        return 0
    out = Path(cfg.output_dir) / cfg.experiment
    if cfg.analysis is not None:
        print(f"results in {out}/ (tensorboard --logdir {out / 'tensorboard'})")
        return 0
    print(compact_table(rows))
    print(f"full table in {out / 'summary.md'}; results in {out}/ (tensorboard --logdir {out / 'tensorboard'})")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
