"""Meta-test evaluation: adapt Φ on fresh tasks' support sets, score their query sets."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from distmeta.algorithms import InnerLoop, adaptation_curve
from distmeta.checkpoint import latest_checkpoint, load_checkpoint
from distmeta.components import build_model, build_sampler, data_sha256, eval_inner_loop, with_queries
from distmeta.config import JobConfig, load_run_job
from distmeta.data.sampling import TaskSampler
from distmeta.device import precision_context, resolve_device, to_device
from distmeta.models import TaskModel
from distmeta.models.base import check_params
from distmeta.storage import Location
from distmeta.types import NonFiniteError, Params


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and the half-width 1.96·s/√n of its normal 95% interval (s with n − 1)."""
    values = values.double()
    return values.mean().item(), 1.96 * values.std(unbiased=True).item() / math.sqrt(len(values))


def evaluate(model: TaskModel, phi: Params, sampler: TaskSampler, split: str, tasks: int, inner: InnerLoop,
             batch: int = 50, round_index: int = 0, device: torch.device | str = "cpu",
             precision: str = "fp32", record_at: tuple[int, ...] | None = None,
             allow_non_finite: bool = False) -> dict[int, dict[str, float]]:
    """Query metrics (mean and ``<name>_ci95``) over ``tasks`` tasks after each step count.

    Tasks are the counter-based tasks ``0..tasks-1`` of round ``round_index`` of ``split``,
    so the same call always scores the same tasks; another round draws fresh ones.
    Returns ``{steps: {"loss": .., "loss_ci95": .., "accuracy": .., ...}}`` for each entry of
    ``record_at`` (default: only ``inner.steps``).

    Raises:
        NonFiniteError: a non-finite mean loss (adaptation diverged: NaN logits would score
            chance accuracy, which reads as a result), unless ``allow_non_finite``, which
            reports every metric of such a step count as NaN instead.
    """
    device = torch.device(device)
    record_at = record_at or (inner.steps,)
    phi = {n: p.detach().to(device) for n, p in phi.items()}
    per_task: dict[int, dict[str, list[torch.Tensor]]] = {s: {} for s in record_at}
    for start in range(0, tasks, batch):
        chunk = to_device(sampler.sample(split, round_index, start, min(start + batch, tasks)), device)
        with precision_context(precision, device):
            curve = adaptation_curve(model.batched_loss, phi, chunk.support, chunk.query, inner, record_at)
        for steps, metrics in curve.items():
            for name, values in metrics.items():
                per_task[steps].setdefault(name, []).append(values.float().cpu())
    report: dict[int, dict[str, float]] = {}
    for steps, metrics in per_task.items():
        report[steps] = {"tasks": tasks}
        for name, chunks in metrics.items():
            mean, ci = mean_ci95(torch.cat(chunks))
            report[steps][name], report[steps][f"{name}_ci95"] = mean, ci
        if not math.isfinite(report[steps]["loss"]):
            if not allow_non_finite:
                raise NonFiniteError(f"{split} loss after {steps} inner step(s) at rate {inner.lr} is "
                                     f"{report[steps]['loss']}: adaptation diverges from this Φ (lower algorithm."
                                     "inner_lr, or the steps: eval.inner_steps, --steps); no score is reported")
            report[steps] = {name: value if name == "tasks" else math.nan for name, value in report[steps].items()}
    return report


def evaluate_run(run_dir: str | Path | Location, tasks: int | None = None, steps: int | None = None,
                 split: str | None = None, round_index: int = 1) -> dict[str, float]:
    """Re-evaluate a run directory's final checkpoint on freshly drawn tasks.

    ``round_index`` 1 differs from the tasks scored at the end of training (round 0).
    Returns the metrics plus ``tasks``, ``steps``, ``split``, ``round``, ``metric`` and
    ``ci95`` (of accuracy for classifiers, of MSE for regression).

    Raises:
        ValueError: fewer than 2 tasks, a negative round or step count, a checkpoint that
            does not fit the job's model, or data other than the run was trained on.
        FileNotFoundError: no checkpoint in the run directory.
    """
    run_dir = Location(run_dir)
    job = load_run_job(run_dir)
    tasks = job.eval.tasks if tasks is None else tasks
    if tasks < 2 or round_index < 0 or (steps is not None and steps < 0):
        raise ValueError(f"need tasks >= 2, round >= 0 and steps >= 0; got {tasks}, {round_index}, {steps}")
    if job.runtime.threads:
        torch.set_num_threads(job.runtime.threads)
    state = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    inner = eval_inner_loop(job, steps)
    split = split or job.eval.split
    sampler = with_queries(build_sampler(job), job.eval.queries)
    model = build_model(job)
    check_params(model.init(torch.Generator()), state["phi"], f"the checkpoint of {run_dir}")
    if state.get("data_sha256", None) not in (None, data_sha256(job)):
        raise ValueError(f"{run_dir} was trained on other data than its job now finds (sha256 "
                         f"{state['data_sha256'][:12]}…): point data.* or $DISTMETA_* at the data it was trained on")
    report = evaluate(model, state["phi"], sampler, split, tasks, inner, job.eval.batch, round_index,
                      resolve_device(job.runtime.device), job.runtime.precision)[inner.steps]
    return headline(report) | {"steps": inner.steps, "split": split, "round": round_index}


def headline(report: dict[str, float]) -> dict[str, float]:
    """A report with the headline metric also under ``ci95``: accuracy, token accuracy
    (translation) or mse, whichever the model reports."""
    name = next(n for n in ("accuracy", "token_accuracy", "mse") if n in report)
    return {**report, "metric": name, "ci95": report[f"{name}_ci95"]}


class JobEvaluator:
    """Meta-validation and the final meta-test of a job's Φ, built once per process (the
    training driver, or an evaluator actor so that validation never stalls training)."""

    def __init__(self, job: JobConfig, device: torch.device | str | None = None) -> None:
        self.job, self.model = job, build_model(job)
        self.sampler = with_queries(build_sampler(job), job.eval.queries)
        self.device = resolve_device(job.runtime.device) if device is None else torch.device(device)

    def _report(self, phi: Params, split: str, tasks: int, allow_non_finite: bool = False) -> dict[str, float]:
        job = self.job
        return evaluate(self.model, phi, self.sampler, split, tasks, eval_inner_loop(job), job.eval.batch,
                        device=self.device, precision=job.runtime.precision,
                        allow_non_finite=allow_non_finite)[job.eval.inner_steps]

    def validate(self, phi: Params) -> dict[str, float]:
        """``val_<metric>`` after ``eval.inner_steps`` on ``train.val_tasks`` meta-validation tasks.
        A diverging adaptation gives a NaN row (the driver warns), not an error: training itself
        is fine, and stopping it would lose the steps since the last checkpoint."""
        report = self._report(phi, "val", self.job.train.val_tasks, allow_non_finite=True)
        return {f"val_{k}": v for k, v in report.items() if k != "tasks"}

    def test(self, phi: Params) -> dict[str, float]:
        """The headline report on ``eval.tasks`` tasks of ``eval.split`` (round 0)."""
        return headline(self._report(phi, self.job.eval.split, self.job.eval.tasks))
