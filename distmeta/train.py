"""The meta-training recipe: setup → loop (contribution, outer update, log, validate,
checkpoint) → final meta-test evaluation, ``summary.json`` and the learning-curve plot."""
from __future__ import annotations

import json
import logging
import math
import time
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map

from distmeta.algorithms.inner import adapted_names
from distmeta.checkpoint import checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from distmeta.components import (
    build_job_algorithm,
    build_job_optimizer,
    build_model,
    build_sampler,
    eval_inner_loop,
    with_queries,
)
from distmeta.config import JobConfig, job_to_dict, load_run_job
from distmeta.data.sampling import TaskSampler
from distmeta.device import resolve_device
from distmeta.evaluate import evaluate, headline
from distmeta.metrics import MetricsLog, Progress, plot_learning_curve
from distmeta.models import TaskModel
from distmeta.optim import OptState
from distmeta.runtime import Executor, LocalExecutor
from distmeta.types import Params

log = logging.getLogger("distmeta")
# What may differ between a run and its resumption: nothing that changes the math.
RESUMABLE_KEYS = ("train.*", "runtime.workers", "runtime.address", "runtime.worker_cpus", "runtime.worker_gpus",
                  "runtime.threads")


class NonFiniteError(FloatingPointError):
    """A meta-gradient or Φ went NaN/infinite; Φ was not updated and checkpoints are intact."""


def default_run_dir(job: JobConfig) -> Path:
    """``runs/<name>-<date>-<time>``, so runs never collide by default."""
    return Path("runs") / f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(job: JobConfig, out_dir: str | Path | None = None, resume: bool = False,
          executor: Executor | None = None) -> dict[str, Any]:
    """Meta-train ``job`` into ``out_dir`` and return the summary also written to summary.json.

    With ``resume``, continue from the newest checkpoint in ``out_dir``: Φ, optimizer state,
    step, the executor's path and the training time spent carry over, so the run ends with
    the same Φ as an uninterrupted one. ``executor`` replaces the in-process one.

    Raises:
        FileExistsError: ``out_dir`` already holds checkpoints and ``resume`` is off.
        ValueError: resuming with a job that differs outside ``train``.
        FileNotFoundError: ``resume`` without a checkpoint.
        NonFiniteError: a non-finite meta-gradient or Φ (lower the learning rates).
    """
    run_dir = Path(out_dir) if out_dir is not None else default_run_dir(job)
    _check_run_dir(job, run_dir, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(job_to_dict(job), indent=2))
    file_log = logging.FileHandler(run_dir / "train.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(file_log)
    log.setLevel(logging.INFO)
    try:
        if executor is None and job.runtime.workers > 0:
            return _train_on_ray(job, run_dir, resume)
        return _train(job, run_dir, resume, executor)
    finally:
        log.removeHandler(file_log)
        file_log.close()


def _train_on_ray(job: JobConfig, run_dir: Path, resume: bool) -> dict[str, Any]:
    from distmeta.runtime.ray_executor import RayExecutor, RaySession

    path = load_checkpoint(latest_checkpoint(run_dir / "checkpoints")).get("path") if resume else None
    with RaySession(job.runtime.address):
        executor = RayExecutor(job_to_dict(job), job.runtime.workers, job.runtime.worker_cpus,
                               job.runtime.worker_gpus, path)
        try:
            return _train(job, run_dir, resume, executor)
        finally:
            executor.shutdown()


def _check_run_dir(job: JobConfig, run_dir: Path, resume: bool) -> None:
    if not resume:
        if checkpoints(run_dir / "checkpoints"):
            raise FileExistsError(f"{run_dir} already holds a run; resume it (--resume) or choose another --out")
        return
    latest_checkpoint(run_dir / "checkpoints")  # FileNotFoundError when there is nothing to resume
    saved, wanted = _flat(job_to_dict(load_run_job(run_dir))), _flat(job_to_dict(job))
    changed = [k for k in saved if saved[k] != wanted[k] and not any(fnmatch(k, p) for p in RESUMABLE_KEYS)]
    if changed:
        raise ValueError(f"cannot resume {run_dir} with a different job: {', '.join(changed)} changed "
                         f"(only {', '.join(RESUMABLE_KEYS)} may change)")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat


def _train(job: JobConfig, run_dir: Path, resume: bool, executor: Executor | None) -> dict[str, Any]:
    if job.runtime.threads:
        torch.set_num_threads(job.runtime.threads)
    device = resolve_device(job.runtime.device)
    model, sampler, optimizer = build_model(job), build_sampler(job), build_job_optimizer(job)
    eval_sampler = with_queries(sampler, job.eval.queries)
    adapted_names(model.init(torch.Generator()), job.algorithm.adapt)  # fail now, not at the first evaluation
    state = _initial_state(job, model, optimizer.init, run_dir, resume, device)
    phi, opt_state, first_step = state["phi"], state["opt_state"], state["step"]
    executor = executor or LocalExecutor(model, build_job_algorithm(job), sampler, state.get("path") or job.runtime.path,
                                         job.runtime.precision, device, job.runtime.compile)
    tr = job.train
    progress = Progress(tr.steps, tr.meta_batch, tr.time_limit_s, first_step, state.get("elapsed_s", 0.0))
    metrics_log = MetricsLog(run_dir, resume_step=first_step if resume else None)
    window: dict[str, float] = dict(state.get("window", {}))  # metrics since the last logged step
    step = first_step
    log.info("training %s (%s) in %s from step %d on %s", job.name, job.algorithm.name, run_dir, step, device)
    try:
        while step < tr.steps and not progress.out_of_time():
            contribution = executor.contribution(phi, step, tr.meta_batch)
            grads = {n: g / contribution.num_tasks for n, g in contribution.grad_sum.items()}
            _check_finite(grads, step, "meta-gradient")
            new_phi, new_opt_state = optimizer.update(phi, grads, opt_state)
            _check_finite(new_phi, step, "updated Φ")
            phi, opt_state, step = new_phi, new_opt_state, step + 1
            _accumulate(window, contribution)
            if step % tr.log_every == 0:
                _log_step(job, model, phi, eval_sampler, device, step, window, metrics_log, progress)
            if step % tr.checkpoint_every == 0:
                _save(run_dir, step, phi, opt_state, job, executor, progress, window)
        if window:  # the partial window at the end (step or time limit)
            _log_step(job, model, phi, eval_sampler, device, step, window, metrics_log, progress)
    except KeyboardInterrupt:
        _save(run_dir, step, phi, opt_state, job, executor, progress, window)
        log.info("interrupted at step %d; checkpoint written, continue with --resume %s", step, run_dir)
        raise
    finally:
        metrics_log.close()
    wall_s = progress.elapsed()
    saved = checkpoints(run_dir / "checkpoints")
    if not saved or saved[-1].name != f"step_{step:08d}.pt":
        _save(run_dir, step, phi, opt_state, job, executor, progress)
    summary = _summary(job, model, phi, eval_sampler, device, step, wall_s, getattr(executor, "path", None))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if (run_dir / "metrics.csv").exists():
        plot_learning_curve(run_dir)
    log.info("done: %s", json.dumps(summary))
    return summary


def _initial_state(job: JobConfig, model: TaskModel, init_optimizer, run_dir: Path, resume: bool,
                   device: torch.device) -> dict[str, Any]:
    if resume:
        state = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
        log.info("resuming from step %d", state["step"])
        return {**state, "phi": _to(state["phi"], device), "opt_state": _to(state["opt_state"], device),
                "step": int(state["step"])}
    phi = {n: p.to(device) for n, p in model.init(torch.Generator().manual_seed(job.seed)).items()}
    return {"phi": phi, "opt_state": init_optimizer(phi), "step": 0}


def _to(tree: Any, device: torch.device | str) -> Any:
    return tree_map(lambda v: v.to(device) if torch.is_tensor(v) else v, tree)


def _check_finite(tensors: Params, step: int, what: str) -> None:
    bad = [n for n, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteError(f"non-finite {what} at step {step} in {', '.join(bad)}; Φ was not updated and "
                             "checkpoints are intact. Lower optimizer.lr or algorithm.inner_lr.")


def _accumulate(window: dict[str, float], contribution) -> None:
    """Running sums of per-task-mean metrics since the last logged step (``steps`` counts them)."""
    for name, total in contribution.metrics.items():
        window[name] = window.get(name, 0.0) + total.item() / contribution.num_tasks
    window["steps"] = window.get("steps", 0) + 1


def _log_step(job: JobConfig, model: TaskModel, phi: Params, eval_sampler: TaskSampler, device: torch.device, step: int,
              window: dict[str, float], metrics_log: MetricsLog, progress: Progress) -> None:
    steps = window.pop("steps")
    values = {f"train_{k}": v / steps for k, v in window.items()}
    values["tasks_per_s"] = progress.tasks_per_s(step)
    if job.train.val_every and step % job.train.val_every == 0:
        values |= _validate(job, model, phi, eval_sampler, device)
    metrics_log.write(step, values)
    log.info(progress.line(step, values))
    window.clear()


def _save(run_dir: Path, step: int, phi: Params, opt_state: OptState, job: JobConfig, executor: Executor,
          progress: Progress, window: dict[str, float] | None = None) -> None:
    """Everything a resumed run needs to continue as if never stopped, the metrics
    accumulated since the last logged step included."""
    state = {"phi": _to(phi, "cpu"), "opt_state": _to(opt_state, "cpu"), "elapsed_s": progress.elapsed(),
             "path": getattr(executor, "path", None), "window": dict(window or {})}
    save_checkpoint(run_dir / "checkpoints", step, state, job.train.keep_checkpoints)


def _validate(job: JobConfig, model: TaskModel, phi: Params, eval_sampler: TaskSampler,
              device: torch.device) -> dict[str, float]:
    report = evaluate(model, phi, eval_sampler, "val", job.train.val_tasks,
                      eval_inner_loop(job), job.eval.batch, device=device, precision=job.runtime.precision)
    return {f"val_{k}": v for k, v in report[job.eval.inner_steps].items() if k != "tasks"}


def _summary(job: JobConfig, model: TaskModel, phi: Params, eval_sampler: TaskSampler, device: torch.device, step: int,
             wall_s: float, path: str | None) -> dict[str, Any]:
    """``wall_s`` is the training time of the whole run, resumptions included."""
    report = headline(evaluate(model, phi, eval_sampler, job.eval.split,
                               job.eval.tasks, eval_inner_loop(job), job.eval.batch, device=device,
                               precision=job.runtime.precision)[job.eval.inner_steps])
    split = job.eval.split
    return {
        "name": job.name,
        "algorithm": job.algorithm.name,
        "steps": step,
        "wall_s": round(wall_s, 2),
        "tasks_per_s": step * job.train.meta_batch / wall_s if wall_s > 0 else math.nan,
        f"{split}_{report['metric']}": report[report["metric"]],
        f"{split}_ci95": report["ci95"],
        f"{split}_tasks": job.eval.tasks,
        f"{split}_loss": report["loss"],
        "eval_inner_steps": job.eval.inner_steps,
        "device": str(device),
        "precision": job.runtime.precision,
        "path": path,
        "workers": job.runtime.workers,
    }
