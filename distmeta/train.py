"""The meta-training recipe: setup → loop (contribution, outer update, log, validate,
checkpoint) → final meta-test evaluation and ``summary.json``."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from distmeta.checkpoint import checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from distmeta.components import (build_job_algorithm, build_job_optimizer, build_model, build_sampler,
                                 eval_inner_loop, with_queries)
from distmeta.config import JobConfig, job_to_dict
from distmeta.evaluate import evaluate, headline
from distmeta.metrics import MetricsLog, Progress
from distmeta.runtime import Executor, LocalExecutor, resolve_device
from distmeta.types import Params

log = logging.getLogger("distmeta")


class NonFiniteError(FloatingPointError):
    """A meta-gradient was NaN or infinite; Φ and the checkpoints were left untouched."""


def default_run_dir(job: JobConfig) -> Path:
    return Path("runs") / f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(job: JobConfig, out_dir: str | Path | None = None, resume: bool = False,
          executor: Executor | None = None) -> dict[str, Any]:
    """Meta-train ``job`` into ``out_dir`` and return the summary also written to summary.json.

    With ``resume``, continue from the newest checkpoint in ``out_dir``. ``executor`` replaces
    the in-process one (the distributed runtime passes its own).

    Raises:
        NonFiniteError: a non-finite meta-gradient (lower the learning rates).
        FileNotFoundError: ``resume`` without a checkpoint.
    """
    run_dir = Path(out_dir) if out_dir is not None else default_run_dir(job)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(job_to_dict(job), indent=2))
    file_log = logging.FileHandler(run_dir / "train.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(file_log)
    try:
        return _train(job, run_dir, resume, executor)
    finally:
        log.removeHandler(file_log)
        file_log.close()


def _train(job: JobConfig, run_dir: Path, resume: bool, executor: Executor | None) -> dict[str, Any]:
    if job.runtime.threads:
        torch.set_num_threads(job.runtime.threads)
    device = resolve_device(job.runtime.device)
    model, sampler, optimizer = build_model(job), build_sampler(job), build_job_optimizer(job)
    executor = executor or LocalExecutor(model, build_job_algorithm(job), sampler, job.runtime.path,
                                         job.runtime.precision, device, job.runtime.compile)
    phi, opt_state, first_step = _initial_state(job, model, optimizer, run_dir, resume, device)
    tr = job.train
    progress = Progress(tr.steps, tr.meta_batch, tr.time_limit_s, first_step)
    metrics_log = MetricsLog(run_dir, append=resume and first_step > 0)
    window: dict[str, float] = {}
    step = first_step
    log.info("training %s (%s) in %s from step %d on %s", job.name, job.algorithm.name, run_dir, step, device)
    try:
        while step < tr.steps and not (tr.time_limit_s and progress.elapsed() >= tr.time_limit_s):
            contribution = executor.contribution(phi, step, tr.meta_batch)
            grads = {n: g / contribution.num_tasks for n, g in contribution.grad_sum.items()}
            _check_finite(grads, step)
            phi, opt_state = optimizer.update(phi, grads, opt_state)
            step += 1
            for name, total in contribution.metrics.items():
                window[name] = window.get(name, 0.0) + total.item() / contribution.num_tasks
            window["_steps"] = window.get("_steps", 0) + 1
            if step % tr.log_every == 0 or step == tr.steps:
                values = {f"train_{k}": v / window["_steps"] for k, v in window.items() if k != "_steps"}
                values["tasks_per_s"] = progress.tasks_per_s(step)
                if tr.val_every and step % tr.val_every == 0:
                    values |= _validate(job, model, phi, sampler, device)
                metrics_log.write(step, values)
                log.info(progress.line(step, values))
                window = {}
            if step % tr.checkpoint_every == 0:
                _save(run_dir, step, phi, opt_state, job)
    finally:
        metrics_log.close()
    wall_s = progress.elapsed()
    if not checkpoints(run_dir / "checkpoints") or load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))["step"] != step:
        _save(run_dir, step, phi, opt_state, job)
    summary = _summary(job, model, phi, sampler, device, step, first_step, wall_s)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("done: %s", json.dumps(summary))
    return summary


def _initial_state(job, model, optimizer, run_dir: Path, resume: bool, device: torch.device):
    if resume:
        state = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
        move = lambda tree: {k: (v.to(device) if torch.is_tensor(v) else move(v) if isinstance(v, dict) else v)  # noqa: E731
                             for k, v in tree.items()}
        log.info("resuming from step %d", state["step"])
        return move(state["phi"]), move(state["opt_state"]), int(state["step"])
    phi = {n: p.to(device) for n, p in model.init(torch.Generator().manual_seed(job.seed)).items()}
    return phi, optimizer.init(phi), 0


def _check_finite(grads: Params, step: int) -> None:
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    if bad:
        raise NonFiniteError(f"non-finite meta-gradient at step {step} in {', '.join(bad)}; Φ was not "
                             "updated and checkpoints are intact. Lower optimizer.lr or algorithm.inner_lr.")


def _save(run_dir: Path, step: int, phi: Params, opt_state: dict, job: JobConfig) -> None:
    to_cpu = lambda tree: {k: (v.cpu() if torch.is_tensor(v) else to_cpu(v) if isinstance(v, dict) else v)  # noqa: E731
                           for k, v in tree.items()}
    save_checkpoint(run_dir / "checkpoints", step, {"phi": to_cpu(phi), "opt_state": to_cpu(opt_state)},
                    job.train.keep_checkpoints)


def _validate(job: JobConfig, model, phi: Params, sampler, device) -> dict[str, float]:
    report = evaluate(model, phi, with_queries(sampler, job.eval.queries), "val", job.train.val_tasks,
                      eval_inner_loop(job), job.eval.batch, device=device, precision=job.runtime.precision)
    return {f"val_{k}": v for k, v in report[job.eval.inner_steps].items() if k != "tasks"}


def _summary(job, model, phi, sampler, device, step: int, first_step: int, wall_s: float) -> dict[str, Any]:
    report = headline(evaluate(model, phi, with_queries(sampler, job.eval.queries), job.eval.split,
                               job.eval.tasks, eval_inner_loop(job), job.eval.batch, device=device,
                               precision=job.runtime.precision)[job.eval.inner_steps])
    trained = step - first_step
    return {
        "name": job.name,
        "algorithm": job.algorithm.name,
        "steps": step,
        "wall_s": round(wall_s, 2),
        "tasks_per_s": trained * job.train.meta_batch / wall_s if wall_s > 0 else math.nan,
        f"{job.eval.split}_{report['metric']}": report[report["metric"]],
        f"{job.eval.split}_ci95": report["ci95"],
        f"{job.eval.split}_tasks": job.eval.tasks,
        f"{job.eval.split}_loss": report["loss"],
        "eval_inner_steps": job.eval.inner_steps,
        "device": str(device),
        "precision": job.runtime.precision,
    }
