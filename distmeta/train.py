"""The meta-training recipe: setup → loop (advance, log, validate, checkpoint) → final
meta-test evaluation, ``summary.json`` and the learning-curve plot.

The loop is the same in one process and on a Ray cluster: a runtime (``LocalRuntime`` or
``RayRuntime``) computes and applies steps; this module decides what to log and when to save.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from distmeta.algorithms.inner import adapted_names
from distmeta.checkpoint import checkpoint_step, checkpoints, latest_checkpoint, load_checkpoint
from distmeta.components import build_model, build_sampler, data_sha256
from distmeta.config import RESOURCE_KEYS, JobConfig, changed_keys, job_from_dict, job_to_dict, load_run_job
from distmeta.device import resolve_device
from distmeta.metrics import MetricsLog, PendingRows, Progress, plot_learning_curve
from distmeta.runtime import LocalRuntime, Rewound, Runtime
from distmeta.runtime.parameter_store import NonFiniteError, StepRecord
from distmeta.storage import Location

__all__ = ["NonFiniteError", "RESUMABLE_KEYS", "default_run_dir", "train"]

log = logging.getLogger("distmeta")
# What may differ between a run and its resumption: nothing that changes the math.
RESUMABLE_KEYS = ("train.steps", "train.time_limit_s", "train.log_every", "train.val_every", "train.val_tasks",
                  "train.checkpoint_every", "train.keep_checkpoints", *RESOURCE_KEYS,
                  "data.*")  # where the data is (a run moved to another machine), not which data


def default_run_dir(job: JobConfig) -> str:
    """``<runtime.storage or runs>/<name>-<date>-<time>``, so runs never collide by default."""
    return f"{(job.runtime.storage or 'runs').rstrip('/')}/{job.name}-{time.strftime('%Y%m%d-%H%M%S')}"


CheckpointHook = Callable[[int, Location, list[dict[str, float]]], None]


def train(job: JobConfig, out: str | Path | None = None, resume: bool = False,
          runtime: Runtime | None = None, on_checkpoint: CheckpointHook | None = None) -> dict[str, Any]:
    """Meta-train ``job`` into the run location ``out`` (a folder or a ``pyarrow.fs`` URI)
    and return the summary also written to summary.json.

    With ``resume``, continue from the newest checkpoint there: Φ, optimizer and sampler
    state, step, the executor path, the training time spent and the metrics since the last
    log carry over, so the run ends with the same Φ as an uninterrupted one (sync mode).
    ``runtime`` replaces the one the job names (tests use it to inject faults).
    ``on_checkpoint(step, checkpoint, rows)`` runs after each checkpoint with the metrics rows
    written since the previous one (a Ray Tune trial reports them).

    Raises:
        FileExistsError: ``out`` already holds checkpoints, or a finished run's summary, and
            ``resume`` is off (a run that failed before its first checkpoint starts over).
        ValueError: resuming with a job that differs outside ``RESUMABLE_KEYS``, with fewer
            ``train.steps`` than the checkpoint's step, or with other ``train.steps`` under a
            schedule that decays over them, or whose data has another digest; a cluster that
            cannot hold the workers.
        PermissionError: the run location is not writable.
        FileNotFoundError: ``resume`` without a checkpoint.
        NonFiniteError: a non-finite meta-gradient or Φ (lower the learning rates).
    """
    run = Location(out if out is not None else default_run_dir(job))
    state = _check_run(job, run, resume)
    data = data_sha256(job)  # after the folder checks: it may download or preprocess the data
    if state is not None and state.get("data_sha256", data) != data:
        raise ValueError(f"cannot resume {run}: its data has changed (sha256 {str(state['data_sha256'])[:12]}… "
                         f"when checkpointed, {str(data)[:12]}… now); data.* may say where the same data lies, "
                         "not name other data")
    run.check_writable()
    local_dir = run.local or _staging_dir(run)
    if run.local is None:  # the staging copy starts from what the run location holds, nothing else
        shutil.rmtree(local_dir, ignore_errors=True)
        if resume:
            run.download_to(local_dir, skip=("checkpoints",))
    local_dir.mkdir(parents=True, exist_ok=True)
    if state is None:  # starting over a run that never checkpointed: its events would mix with the new ones
        shutil.rmtree(local_dir / "tensorboard", ignore_errors=True)
    Location(local_dir / "config.json").write_bytes(json.dumps(job_to_dict(job), indent=2).encode())
    file_log = logging.FileHandler(local_dir / "train.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(file_log)
    log.setLevel(logging.INFO)
    if job.runtime.threads:
        torch.set_num_threads(job.runtime.threads)
    adapted_names(build_model(job).init(torch.Generator()), job.algorithm.adapt)  # fail now, not at evaluation
    try:
        with contextlib.ExitStack() as stack:
            if runtime is None:
                runtime = _make_runtime(job, run, state, stack)
            stack.callback(runtime.close)
            stack.enter_context(_sigterm_as_interrupt())  # after ray.init, which sets its own handler
            return _train(job, run, local_dir, runtime, state, on_checkpoint, data)
    finally:
        log.removeHandler(file_log)
        file_log.close()
        if run.local is None:
            run.upload_from(local_dir)


def _make_runtime(job: JobConfig, run: Location, state: dict[str, Any] | None,
                  stack: contextlib.ExitStack) -> Runtime:
    if job.runtime.workers == 0:
        return LocalRuntime(job, run, state, resolve_device(job.runtime.device))
    from distmeta.runtime.ray_runtime import RayRuntime, RaySession

    build_sampler(job)  # builds the data caches once here, before every worker and the evaluator want them
    stack.enter_context(RaySession(job.runtime.address))
    return RayRuntime(job, run, state)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (``ray job stop``, a scheduler preempting the job) stops training as Ctrl-C
    does: the step in flight lands and a checkpoint is written. Ray's own driver handler
    would exit at once and lose the steps since the last checkpoint. Later SIGTERMs are
    ignored while that checkpoint is written."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _staging_dir(run: Location) -> Path:
    """Where the driver writes a remote run's metrics before copying them there."""
    return Path(tempfile.gettempdir()) / "distmeta-runs" / hashlib.sha1(run.uri.encode()).hexdigest()[:16]


def _check_run(job: JobConfig, run: Location, resume: bool) -> dict[str, Any] | None:
    """The newest checkpoint's state when resuming, once ``job`` is found fit to continue it
    (the caller checks its data); nothing in ``run`` is written before this passes."""
    if not resume:
        if checkpoints(run / "checkpoints"):
            raise FileExistsError(f"{run} already holds a run; resume it (--resume) or choose another --out")
        if (run / "summary.json").exists():
            raise FileExistsError(f"{run} holds a finished run (summary.json) whose checkpoints are gone; "
                                  "choose another --out")
        if (run / "metrics.csv").exists():  # a run that failed before its first checkpoint: nothing to resume
            log.warning("%s holds a run that stopped before its first checkpoint; starting it over", run)
        return None
    newest = latest_checkpoint(run / "checkpoints")  # FileNotFoundError when there is nothing to resume
    at = checkpoint_step(newest)
    if job.train.steps < at:
        raise ValueError(f"cannot resume {run} with train.steps {job.train.steps}: its checkpoint is at step {at}")
    state = load_checkpoint(newest)
    # the job Φ was trained with, whatever config.json says now (checkpoints from before it was kept: config.json)
    saved = job_from_dict(state["config"], str(newest)) if "config" in state else load_run_job(run)
    changed = changed_keys(saved, job, ignore=RESUMABLE_KEYS)
    if changed:
        raise ValueError(f"cannot resume {run} with a different job: {', '.join(changed)} changed "
                         f"(only {', '.join(RESUMABLE_KEYS)} may change)")
    schedule = saved.optimizer
    if job.train.steps != saved.train.steps and schedule.schedule != "constant" and schedule.schedule_steps is None:
        raise ValueError(f"cannot resume {run} with train.steps {job.train.steps} instead of {saved.train.steps}: "
                         f"its {schedule.schedule} learning-rate schedule decays over train.steps "
                         f"(optimizer.schedule_steps is null), so the rate would jump mid-run; keep train.steps, "
                         f"or start runs that may be extended with optimizer.schedule_steps set")
    return state


def _train(job: JobConfig, run: Location, local_dir: Path, runtime: Runtime, state: dict[str, Any] | None,
           on_checkpoint: CheckpointHook | None, data: str | None) -> dict[str, Any]:
    tr = job.train
    step = runtime.version
    progress = Progress(tr.steps, tr.meta_batch, tr.time_limit_s, step, (state or {}).get("elapsed_s", 0.0))
    metrics_log = MetricsLog(local_dir, resume_step=step if state else None)
    rows = PendingRows(metrics_log, progress)
    window: dict[str, float] = dict((state or {}).get("window", {}))  # metrics since the last logged step
    log.info("training %s (%s) in %s from step %d", job.name, job.algorithm.name, run, step)

    unsaved = False  # records absorbed since the last checkpoint

    def save() -> None:
        nonlocal unsaved
        unsaved = False
        rows.write_ready(wait=True)  # a checkpoint never runs ahead of the metrics it stands for
        runtime.checkpoint({"elapsed_s": progress.elapsed(), "window": dict(window), "data_sha256": data})
        if run.local is None:
            run.upload_from(local_dir)
        if on_checkpoint is not None:
            on_checkpoint(step, latest_checkpoint(run / "checkpoints"), rows.written)
        rows.written = []

    def absorb(records: list[StepRecord], boundaries: bool = True) -> None:
        """Take applied steps into the window; log and checkpoint at their boundaries."""
        nonlocal step, unsaved
        for record in records:
            step, unsaved = record.step + 1, True
            _accumulate(window, record)
            if boundaries and step % tr.log_every == 0:
                _log_step(job, runtime, rows, progress, step, window)
            if boundaries and step % tr.checkpoint_every == 0:
                save()

    try:
        while True:
            try:
                while step < tr.steps and not progress.out_of_time():
                    absorb(runtime.advance())
                    step = max(step, runtime.version)  # async: steps whose records a server restart lost
                    rows.write_ready()
                absorb(runtime.finish(), boundaries=False)  # async: steps applied while the loop was ending
                final_window = bool(window)
                if final_window:  # the partial window at the end (step or time limit)
                    _log_step(job, runtime, rows, progress, step, window)
                rows.write_ready(wait=True)
                wall_s = progress.elapsed()
                if final_window or not _checkpointed(run, step):
                    save()  # (again, if it held the window just logged: a resume must not log it twice)
                break
            except Rewound as rewind:  # the parameter server came back at its checkpoint: redo from there
                rows.drop_after(rewind.step)
                rows.written = [r for r in rows.written if r["step"] <= rewind.step]
                metrics_log.truncate(rewind.step)
                saved_state = load_checkpoint(latest_checkpoint(run / "checkpoints")) if rewind.step else {}
                step, window = rewind.step, dict(saved_state.get("window", {}))
    except KeyboardInterrupt:
        absorb(runtime.finish())  # a step still landing counts, so the checkpoint's window matches its step
        if unsaved or not _checkpointed(run, step):
            save()
        log.info("interrupted at step %d; checkpoint written, continue with --resume %s", step, run)
        raise
    finally:
        metrics_log.close()
    summary = _summary(job, runtime, step, wall_s)
    (local_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if (local_dir / "metrics.csv").exists():
        plot_learning_curve(local_dir)
    log.info("done: %s", json.dumps(summary))
    return summary


def _checkpointed(run: Location, step: int) -> bool:
    """Whether the run's newest checkpoint is at ``step``."""
    saved = checkpoints(run / "checkpoints")
    return bool(saved) and checkpoint_step(saved[-1]) == step


def _accumulate(window: dict[str, float], record: StepRecord) -> None:
    """Running sums of per-task-mean metrics since the last logged step (``steps`` counts them)."""
    for name, total in record.metrics.items():
        window[name] = window.get(name, 0.0) + total / record.num_tasks
    window["steps"] = window.get("steps", 0) + 1


def _log_step(job: JobConfig, runtime: Runtime, rows: PendingRows, progress: Progress, step: int,
              window: dict[str, float]) -> None:
    values = {f"train_{k}": v / window["steps"] for k, v in window.items() if k != "steps"}
    values["tasks_per_s"] = progress.tasks_per_s(step)
    due = job.train.val_every and step % job.train.val_every == 0
    rows.add(step, values, runtime.validate() if due else None)
    window.clear()  # only now: a checkpoint written after Ctrl-C in validate() keeps a whole window


def _summary(job: JobConfig, runtime: Runtime, step: int, wall_s: float) -> dict[str, Any]:
    """``wall_s`` is the training time of the whole run, resumptions included."""
    report = runtime.test()
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
        "precision": job.runtime.precision,
        "path": runtime.path,
        **runtime.info(),
    }
