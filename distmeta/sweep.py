"""Hyperparameter sweeps with Ray Tune: every trial is a distmeta run on the Ray runtime.

A sweep file names a base job, a search space over its keys, the meta-validation metric
and the budget. Each trial is one ``train`` run (parameter server + task workers) whose
resources Tune reserves as one placement group (the workers' bundles), so concurrent trials
never starve each other. Trials report each validation with its checkpoint; ASHA stops the
weak ones early. The sweep folder then holds ``results.csv``, ``heatmap.png``, the best
trial's meta-test report and ``best_job.yaml``, ready to run.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distmeta.checkpoint import checkpoints, load_checkpoint, save_checkpoint
from distmeta.config import (
    ConfigError,
    JobConfig,
    apply_overrides,
    choice,
    job_from_dict,
    job_to_dict,
    names_key,
    read_config_file,
    spec_from_dict,
)
from distmeta.storage import Location

log = logging.getLogger("distmeta")

DISTRIBUTIONS = ("loguniform", "uniform", "grid", "choice")
METRICS = ("val_accuracy", "val_loss", "val_mse")


@dataclass(frozen=True)
class Budget:
    samples: int = 1  # draws from the space (each repeats every grid combination)
    max_concurrent: int = 2  # trials at once
    workers: int = 1  # task workers per trial (each trial runs the parameter-server runtime)
    worker_cpus: float = 1.0
    worker_gpus: float = 0.0


@dataclass(frozen=True)
class SchedulerConfig:
    name: str = choice("asha", "fifo", default="asha")  # asha stops weak trials at validation rungs
    grace_period: int = 1  # validations a trial always gets
    reduction_factor: int = 2  # asha keeps 1/reduction_factor of the trials at each rung


@dataclass(frozen=True)
class SweepConfig:
    name: str = "sweep"
    base: str = ""  # the job file swept over (relative to the sweep file)
    overrides: list[str] = field(default_factory=list)  # key=value overrides of the base job for every trial
    space: dict = field(default_factory=dict)  # job key -> {loguniform|uniform: [low, high]} or {grid|choice: [...]}
    metric: str = choice(*METRICS, default="val_accuracy")  # meta-validation metric to rank trials by
    budget: Budget = field(default_factory=Budget)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    test_tasks: int = 600  # meta-test tasks for the best trial's final report

    @property
    def mode(self) -> str:
        return "max" if self.metric.endswith("accuracy") else "min"


def is_sweep_file(path: str | Path) -> bool:
    """A sweep file names a search ``space``; a job file never does."""
    return names_key(path, "space")


def load_sweep(path: str | Path) -> tuple[SweepConfig, dict]:
    """A validated sweep and its base job (as a raw mapping, overrides applied).

    Every problem is reported at once, before any trial starts: unknown keys, a base job
    that does not load, a space key the job does not have, an empty grid, bounds out of
    order, and any value of the space that the job would reject (e.g. a negative lr).

    Raises:
        ConfigError: listing the problems, each naming its key.
        FileNotFoundError: no sweep file.
    """
    path = Path(path)
    spec = spec_from_dict(SweepConfig, read_config_file(path), str(path))
    base_path = path.parent / spec.base
    if not spec.base or not base_path.is_file():
        raise ConfigError([f"base: no job file {str(base_path)!r}; name the swept job relative to the sweep file"],
                          str(path))
    base = apply_overrides(read_config_file(base_path), [*spec.overrides, *_budget_overrides(spec)])
    problems = _check_space(spec, base)
    b, sc = spec.budget, spec.scheduler
    rules = [(b.samples >= 1, "budget.samples", "must be >= 1"),
             (b.max_concurrent >= 1, "budget.max_concurrent", "must be >= 1"),
             (b.workers >= 1, "budget.workers", "must be >= 1 (trials run on the Ray runtime)"),
             (sc.grace_period >= 1, "scheduler.grace_period", "must be >= 1"),
             (sc.reduction_factor >= 2, "scheduler.reduction_factor", "must be >= 2"),
             (spec.test_tasks >= 2, "test_tasks", "must be >= 2")]
    problems += [f"{key}: {message}" for ok, key, message in rules if not ok]
    if not problems:
        problems = [f"base job {p}" for p in _trial_problems(job_from_dict(base, f"{path}: base job"), spec)]
    if problems:
        raise ConfigError(problems, str(path))
    return spec, base


def _budget_overrides(spec: SweepConfig) -> list[str]:
    """What every trial's job gets: the budget's resources, reports at each validation, no
    cluster address of its own (a trial runs inside the sweep's Ray)."""
    b = spec.budget
    return [f"runtime.workers={b.workers}", f"runtime.worker_cpus={b.worker_cpus}",
            f"runtime.worker_gpus={b.worker_gpus}", "runtime.address=null"]


def _trial_problems(job: JobConfig, spec: SweepConfig) -> list[str]:
    """What a trial's job needs beyond being valid: a report at each validation, with its
    checkpoint, of a metric its tasks have."""
    tr, problems = job.train, []
    if tr.val_every == 0 or tr.steps % tr.val_every:
        problems.append(f"train.val_every: trials report at each validation; it must be > 0 and divide "
                        f"train.steps ({tr.steps})")
    if tr.checkpoint_every != tr.val_every:
        problems.append(f"train.checkpoint_every: trials report a validation with its checkpoint; set it "
                        f"to train.val_every ({tr.val_every}), e.g. in overrides")
    if spec.metric != "val_loss" and ("accuracy" in spec.metric) != (job.task.dataset == "omniglot"):
        problems.append(f"metric: {spec.metric} does not exist for {job.task.dataset} tasks; choose "
                        f"{'val_accuracy' if job.task.dataset == 'omniglot' else 'val_mse'} or val_loss")
    return problems


def _check_space(spec: SweepConfig, base: dict) -> list[str]:
    problems = [] if spec.space else ["space: empty; name at least one job key to sweep"]
    budget_keys = [override.split("=")[0] for override in _budget_overrides(spec)]
    try:  # the base job's own problems are reported once, as its own
        of_base = set(_trial_problems(job_from_dict(base, "base job"), spec))
    except ConfigError:
        of_base = set()
    for key, dist in spec.space.items():
        where = f"space.{key}"
        if key in budget_keys:
            problems.append(f"{where}: every trial gets it from budget.* (the resources the sweep reserves); "
                            f"it cannot be swept")
            continue
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            problems.append(f"{where}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {dist!r}")
            continue
        (kind, values), = dist.items()
        if kind in ("grid", "choice"):
            if not isinstance(values, list) or not values:
                problems.append(f"{where}.{kind}: must be a non-empty list")
                continue
        elif not (isinstance(values, list) and len(values) == 2 and all(_number(v) for v in values)
                  and values[0] < values[1] and (kind == "uniform" or values[0] > 0)):
            problems.append(f"{where}.{kind}: must be [low, high] with low < high"
                            f"{' and low > 0' if kind == 'loguniform' else ''}")
            continue
        for value in values:  # each value (or bound) must make a job that trials can run
            try:
                job = job_from_dict(apply_overrides(base, [f"{key}={json.dumps(value)}"]), "trial")
            except ConfigError as error:
                problems += [f"{where}: {value!r} makes an invalid job: {p}" for p in error.problems]
                continue
            problems += [f"{where}: {value!r} makes a job trials cannot run: {p}"
                         for p in _trial_problems(job, spec) if p not in of_base]
    return problems


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def param_space(spec: SweepConfig) -> dict[str, Any]:
    """The Tune search space: job keys (dotted) to Tune distributions."""
    from ray import tune

    make = {"loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v),
            "grid": tune.grid_search, "choice": tune.choice}
    return {key: make[kind](values) for key, dist in spec.space.items() for kind, values in dist.items()}


def trial_job(base: dict, config: dict[str, Any]) -> JobConfig:
    """The base job with a trial's sampled values."""
    return job_from_dict(apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in config.items()]), "trial")


def run_trial(config: dict[str, Any], *, base: dict, sweep_dir: str, metric: str) -> None:
    """One Tune trial: a distmeta run in ``<sweep>/trials/<trial id>``, reporting each
    checkpoint's validation. A restored trial continues its run (its own newest checkpoint,
    else the one Tune kept)."""
    from ray import tune

    from distmeta.train import train

    job = trial_job(base, config)
    run = Location(sweep_dir) / "trials" / tune.get_context().get_trial_id()
    kept = tune.get_checkpoint()
    if kept is not None and not checkpoints(run / "checkpoints"):
        with kept.as_directory() as folder:
            for saved in sorted(Path(folder).glob("step_*.pt")):
                state = load_checkpoint(saved)
                save_checkpoint(run / "checkpoints", state["step"], state, job.train.keep_checkpoints)

    def report(step: int, checkpoint: Location, rows: list[dict[str, float]]) -> None:
        scored = [r for r in rows if r.get(metric) not in (None, "")]
        if not scored:
            return
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / checkpoint.name).write_bytes(checkpoint.read_bytes())
            values = {k: float(v) for k, v in scored[-1].items() if v not in (None, "")}
            tune.report(values | {"step": step}, checkpoint=tune.Checkpoint.from_directory(folder))

    if (run / "summary.json").exists():  # finished before the sweep driver stopped: report it, redo nothing
        rows = list(csv.DictReader(io.StringIO((run / "metrics.csv").read_bytes().decode())))
        saved = checkpoints(run / "checkpoints")[-1]
        report(int(rows[-1]["step"]), saved, rows)
        return
    train(job, run, resume=bool(checkpoints(run / "checkpoints")), on_checkpoint=report)


def sweep(spec: SweepConfig, base: dict, out: str | Path, resume: bool = False,
          address: str | None = None) -> dict[str, Any]:
    """Run (or, with ``resume``, finish) a sweep into the folder ``out`` and write its report.

    Raises:
        FileExistsError: ``out`` already holds a sweep and ``resume`` is off.
        FileNotFoundError: ``resume`` without a sweep in ``out``.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from distmeta.runtime.ray_runtime import RaySession

    out = Path(out).absolute()
    job = job_from_dict(base, "base job")
    # Trials checkpoint at every report by design; Tune's warning about frequent snapshots is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    with RaySession(address):
        trainable = tune.with_parameters(run_trial, base=base, sweep_dir=str(out), metric=spec.metric)
        b = spec.budget
        bundles = [{"CPU": b.worker_cpus} | ({"GPU": b.worker_gpus} if b.worker_gpus else {})] * b.workers
        rt = job.runtime  # the evaluator actor needs a bundle of its own when it reserves resources
        evaluator = {"CPU": rt.evaluator_cpus} | ({"GPU": rt.evaluator_gpus} if rt.evaluator_gpus else {})
        trainable = tune.with_resources(trainable, tune.PlacementGroupFactory(
            [{"CPU": 0}, *([evaluator] if rt.evaluator_cpus or rt.evaluator_gpus else []), *bundles],
            strategy=rt.placement))
        if resume:
            if not tune.Tuner.can_restore(str(out)):
                raise FileNotFoundError(f"no sweep to resume in {out}")
            tuner = tune.Tuner.restore(str(out), trainable, resume_unfinished=True, resume_errored=True)
        else:
            if out.exists() and any(out.iterdir()):
                raise FileExistsError(f"{out} already holds files; resume the sweep (--resume) or choose another --out")
            # max_t one past the last report: ASHA would otherwise stop a trial at its final report,
            # before it writes its summary.
            reports = job.train.steps // job.train.val_every
            scheduler = (ASHAScheduler(max_t=reports + 1, grace_period=spec.scheduler.grace_period,
                                       reduction_factor=spec.scheduler.reduction_factor)
                         if spec.scheduler.name == "asha" else FIFOScheduler())
            tuner = tune.Tuner(
                trainable, param_space=param_space(spec),
                tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                                            num_samples=b.samples, max_concurrent_trials=b.max_concurrent),
                run_config=tune.RunConfig(name=out.name, storage_path=str(out.parent), verbose=1,
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        results = tuner.fit()
    return write_report(spec, base, out, results)


def write_report(spec: SweepConfig, base: dict, out: Path, results) -> dict[str, Any]:
    """``results.csv``, ``heatmap.png``, the best trial on the meta-test split,
    ``best_job.yaml`` and ``summary.json``; the summary is also returned."""
    from distmeta.evaluate import evaluate_run

    job = job_from_dict(base, "base job")
    rows = []
    for result in results:
        metrics = result.metrics or {}
        step = metrics.get("step")
        steps = trial_job(base, result.config).train.steps
        status = "error" if result.error else "stopped early" if step is not None and step < steps else "done"
        rows.append({"trial": metrics.get("trial_id", Path(result.path).name), **result.config, "status": status,
                     "step": step, "reports": metrics.get("training_iteration"), spec.metric: metrics.get(spec.metric)})
    _write_csv(out / "results.csv", rows)
    finished = [r for r in rows if r[spec.metric] is not None
                and math.isfinite(r[spec.metric])]  # a diverged trial reports NaN, and NaN would win min/max
    if not finished:
        raise RuntimeError(f"no trial of {out} reported a finite {spec.metric}; see the trial errors in {out}")
    best = (max if spec.mode == "max" else min)(finished, key=lambda r: r[spec.metric])
    config = {k: best[k] for k in spec.space}
    test = evaluate_run(Location(out) / "trials" / best["trial"], tasks=spec.test_tasks, split="test",
                        round_index=0)
    best_job = job_to_dict(trial_job(base, config)) | {"name": f"{job.name}_best"}
    (out / "best_job.yaml").write_text(f"# best trial of sweep {spec.name} ({best['trial']}): "
                                       f"{spec.metric} {best[spec.metric]:.4g}\n"
                                       f"# run: distmeta train {out / 'best_job.yaml'}\n" + yaml.safe_dump(best_job))
    a = job.algorithm  # unswept keys plot at the base job's value
    plot_heatmap([{"algorithm.inner_lr": a.inner_lr, "algorithm.inner_steps": a.inner_steps} | r for r in rows],
                 spec, out / "heatmap.png")
    summary = {"name": spec.name, "metric": spec.metric, "mode": spec.mode, "trials": len(rows),
               "stopped_early": sum(1 for r in rows if r["status"] == "stopped early"),
               "best_trial": best["trial"], "best_config": config, f"best_{spec.metric}": best[spec.metric],
               "best_test": {k: test[k] for k in ("metric", test["metric"], "ci95", "tasks", "split")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_heatmap(rows: list[dict[str, Any]], spec: SweepConfig, path: Path) -> Path:
    """The metric over inner_lr × inner_steps, each cell the best trial in it (value written
    in). inner_lr is rounded to 2 significant digits, which bins log-uniform draws by decade
    tenths; ``rows`` carry both keys (the base job's value where a key is not swept)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lr_key, steps_key = "algorithm.inner_lr", "algorithm.inner_steps"
    scored = [r for r in rows if r.get(spec.metric) is not None]
    lr_of = lambda r: float(f"{r[lr_key]:.2g}")  # noqa: E731
    lrs = sorted({lr_of(r) for r in scored})
    steps = sorted({r[steps_key] for r in scored})
    grid = np.full((len(steps), len(lrs)), np.nan)
    pick = max if spec.mode == "max" else min
    for r in scored:
        i, j = steps.index(r[steps_key]), lrs.index(lr_of(r))
        grid[i, j] = r[spec.metric] if np.isnan(grid[i, j]) else pick(grid[i, j], r[spec.metric])
    figure, axes = plt.subplots(figsize=(1.2 * len(lrs) + 3, 0.8 * len(steps) + 2.5))
    image = axes.imshow(grid, cmap="viridis" if spec.mode == "max" else "viridis_r", aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            bright = image.cmap(image.norm(value))[:3]  # dark text on light cells
            color = "black" if 0.299 * bright[0] + 0.587 * bright[1] + 0.114 * bright[2] > 0.5 else "white"
            axes.text(j, i, f"{value:.3g}", ha="center", va="center", color=color, fontsize=8)
    axes.set_xticks(range(len(lrs)), [f"{v:.2g}" for v in lrs], rotation=45)
    axes.set_yticks(range(len(steps)), [str(v) for v in steps])
    axes.set_xlabel(lr_key)
    axes.set_ylabel(steps_key)
    figure.colorbar(image, label=f"{spec.metric} (last report)")
    axes.set_title(f"{spec.name}: {spec.metric} ({'higher' if spec.mode == 'max' else 'lower'} is better)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
