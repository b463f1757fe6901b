"""The sinusoid toy of Finn et al. (2017): MAML against model pre-training.

Both start from the same initialisation and train for the same number of outer steps on
20 points per task: MAML on 10 support + 10 query points, pre-training (which learns from
query sets only) on 20 query points. Then both are adapted on fresh tasks with K = 10 points
and SGD at α = 0.01, and the MSE on 10 query points after 1, 5 and 10 steps is reported,
with the classic figure.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from distmeta.algorithms import InnerLoop, adapt  # noqa: E402
from distmeta.algorithms.inner import expand_to_tasks  # noqa: E402
from distmeta.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from distmeta.components import build_model, build_sampler, eval_inner_loop, with_queries  # noqa: E402
from distmeta.config import JobConfig, job_from_dict  # noqa: E402
from distmeta.evaluate import evaluate  # noqa: E402
from distmeta.models.mlp import mlp_forward  # noqa: E402
from distmeta.train import train  # noqa: E402
from distmeta.types import Params  # noqa: E402

log = logging.getLogger("distmeta")

METHODS = ("maml", "pretrain")
REPORTED_STEPS = (1, 5, 10)
DEFAULT_STEPS = 15000
INNER_LR, SHOTS, QUERIES, EVAL_TASKS = 0.01, 10, 10, 600


def toy_job(method: str, steps: int, seed: int) -> JobConfig:
    """The paper's sinusoid settings: K = 10, MLP 1-40-40-1, α = 0.01, meta-batch 25, Adam 1e-3."""
    queries = QUERIES if method == "maml" else SHOTS + QUERIES  # the same 20 points per task
    return job_from_dict({
        "name": f"toy_{method}", "seed": seed,
        "task": {"dataset": "sinusoid", "shots": SHOTS, "queries": queries},
        "model": {"name": "mlp", "hidden": [40, 40]},
        "algorithm": {"name": method, "inner_lr": INNER_LR, "inner_steps": 1},
        "optimizer": {"name": "adam", "lr": 1e-3},
        "train": {"steps": steps, "meta_batch": 25, "log_every": max(steps // 20, 1), "val_every": 0,
                  "checkpoint_every": steps},
        "eval": {"tasks": EVAL_TASKS, "queries": QUERIES, "inner_steps": max(REPORTED_STEPS)},
        "runtime": {"path": "batched", "device": "cpu"},
    })


def run_toy(out_dir: str | Path, steps: int | None = None, seed: int = 0) -> dict:
    """Train both methods, score them after 1/5/10 adaptation steps, write table + figure."""
    out_dir = Path(out_dir)
    steps = steps or DEFAULT_STEPS
    summary: dict = {"train_steps": steps, "seed": seed, "eval_tasks": EVAL_TASKS, "inner_lr": INNER_LR, "shots": SHOTS}
    trained: dict[str, Params] = {}
    for method in METHODS:
        job = toy_job(method, steps, seed)
        train(job, out_dir / method)
        trained[method] = load_checkpoint(latest_checkpoint(out_dir / method / "checkpoints"))["phi"]
        sampler = with_queries(build_sampler(job), job.eval.queries)  # the tasks of the run's own final test
        report = evaluate(build_model(job), trained[method], sampler, "test", job.eval.tasks,
                          eval_inner_loop(job), batch=job.eval.tasks, record_at=(0, *REPORTED_STEPS))
        summary[method] = {"mse": {str(k): report[k]["mse"] for k in report},
                           "mse_ci95": {str(k): report[k]["mse_ci95"] for k in report}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table(summary))
    plot_adaptation(trained, toy_job("maml", steps, seed), out_dir / "sinusoid.png")
    return summary


def table(summary: dict) -> str:
    """The MSE table, methods by adaptation steps, mean ± 95% CI."""
    shown = (0, *REPORTED_STEPS)  # 0: Φ as it is, before adaptation
    lines = ["method     " + "".join(f"{f'{k} step(s)':>18}" for k in shown)]
    for method in METHODS:
        cells = [f"{summary[method]['mse'][str(k)]:.3f} ± {summary[method]['mse_ci95'][str(k)]:.3f}"
                 for k in shown]
        lines.append(f"{method:<11}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def plot_adaptation(trained: dict[str, Params], job: JobConfig, path: Path, task_indices: tuple[int, ...] = (0, 1)) -> None:
    """For the first test tasks (rows) and each method (columns): the true curve, the K support
    points, and predictions before adaptation and after 1 and 10 steps."""
    sampler = build_sampler(job)
    model = build_model(job)
    grid = torch.linspace(-5, 5, 200).unsqueeze(1)
    figure, axes = plt.subplots(len(task_indices), len(trained), figsize=(6 * len(trained), 3.5 * len(task_indices)),
                                squeeze=False)
    for row, index in zip(axes, task_indices):
        tasks = sampler.sample("test", 0, index, index + 1)
        amplitude, phase = sampler.curve("test", 0, index)
        for axis, (method, phi) in zip(row, trained.items()):
            axis.plot(grid, amplitude * torch.sin(grid - phase), "k-", label="true function")
            axis.plot(tasks.support[0][0], tasks.support[1][0], "k^", label=f"K = {tasks.support[0].shape[1]} points")
            for steps, style in ((0, ":"), (1, "--"), (10, "-")):
                prediction = _adapted_prediction(model, phi, tasks.support, steps, grid)
                axis.plot(grid, prediction, style, label="pre-update" if steps == 0 else f"after {steps} step(s)")
            axis.set_title(f"{'MAML' if method == 'maml' else 'pre-training'}, test task {index}")
            axis.set_xlabel("x")
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _adapted_prediction(model, phi: Params, support, steps: int, grid: torch.Tensor) -> torch.Tensor:
    params = expand_to_tasks({n: p.detach().requires_grad_() for n, p in phi.items()}, 1)
    if steps:
        with torch.enable_grad():
            params = adapt(model.batched_loss, params, support, InnerLoop(INNER_LR, steps), create_graph=False)
    with torch.no_grad():
        return mlp_forward({n: p[0] for n, p in params.items()}, grid)
