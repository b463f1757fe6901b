"""Inner-loop adaptation: SGD or Adam on each task's support set, all tasks at once.

Params here are batched (leading task dimension). Tasks are independent, so the gradient of
the SUM of per-task losses with respect to batched params is every task's own gradient, and
the elementwise optimizer arithmetic (Adam's moments too) stays per task.
"""

from __future__ import annotations

from fnmatch import fnmatch
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from distmeta.types import Batch, BatchedLossFn, Metrics, Params

INNER_OPTIMIZERS = ("sgd", "adam")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


class InnerLoop(NamedTuple):
    """How a task adapts: ``steps`` steps of ``optimizer`` with step size ``lr`` on the
    parameters that match one of the ``adapt`` name patterns (fnmatch, e.g. ``("head.*",)``
    for ANIL). Adam starts from zero moments on every task, as fine-tuning a fresh copy would."""

    lr: float
    steps: int
    adapt: tuple[str, ...] = ("*",)
    optimizer: str = "sgd"


class Moments(NamedTuple):
    """Inner Adam's per-task state: steps taken, first and second moments by name."""

    count: int
    first: Params
    second: Params


def adapted_names(params: Params, patterns: Sequence[str]) -> list[str]:
    """Names of the parameters the inner loop changes.

    Raises:
        ValueError: no parameter matches the patterns.
    """
    names = [name for name in params if any(fnmatch(name, p) for p in patterns)]
    if not names:
        raise ValueError(f"adapt patterns {list(patterns)} match no parameter of {list(params)}")
    return names


def expand_to_tasks(params: Params, num_tasks: int) -> Params:
    """Give every task a view of the shared params; gradients through it sum over tasks."""
    return {name: p.expand(num_tasks, *p.shape) for name, p in params.items()}


def inner_step(
    loss: BatchedLossFn, params: Params, support: Batch, inner: InnerLoop, names: Sequence[str], create_graph: bool,
    moments: Moments | None = None,
) -> tuple[Params, Moments | None]:
    """One inner step for every task; ``moments`` is Adam's state (None before its first step).
    ``create_graph`` keeps second-order terms. Out of place, so it is differentiable.

    Raises:
        ValueError: an inner optimizer other than ``INNER_OPTIMIZERS``.
    """
    if inner.optimizer not in INNER_OPTIMIZERS:
        raise ValueError(f"unknown inner optimizer {inner.optimizer!r}; choose one of {INNER_OPTIMIZERS}")
    losses, _ = loss(params, support)
    grads = dict(zip(names, torch.autograd.grad(losses.sum(), [params[n] for n in names], create_graph=create_graph)))
    if inner.optimizer == "sgd":
        return {**params, **{n: params[n] - inner.lr * g for n, g in grads.items()}}, None
    (beta1, beta2), count = ADAM_BETAS, (moments.count if moments else 0) + 1
    first = {n: (1 - beta1) * g + (beta1 * moments.first[n] if moments else 0) for n, g in grads.items()}
    second = {n: (1 - beta2) * g * g + (beta2 * moments.second[n] if moments else 0) for n, g in grads.items()}
    step = inner.lr / (1 - beta1 ** count)
    scale = (1 - beta2 ** count) ** 0.5
    updated = {n: params[n] - step * first[n] / (second[n].sqrt() / scale + ADAM_EPS) for n in names}
    return {**params, **updated}, Moments(count, first, second)


def adapt(
    loss: BatchedLossFn, params: Params, support: Batch, inner: InnerLoop, create_graph: bool
) -> Params:
    """θ̂ = Φ after ``inner.steps`` steps of the inner optimizer on each task's support set."""
    names = adapted_names(params, inner.adapt)
    moments = None
    for _ in range(inner.steps):
        params, moments = inner_step(loss, params, support, inner, names, create_graph, moments)
    return params


def adaptation_curve(
    loss: BatchedLossFn, phi: Params, support: Batch, query: Batch, inner: InnerLoop, record_at: Sequence[int]
) -> dict[int, Metrics]:
    """Per-task query loss and metrics after each number of inner steps in ``record_at``.

    Used by evaluation and by the toy, where post-adaptation quality at 0, 1, 5, 10 steps is
    the point; no second-order graph is kept.
    """
    tasks = num_tasks(support)
    names = adapted_names(phi, inner.adapt)
    params = {
        n: p.detach().expand(tasks, *p.shape).clone().requires_grad_(n in names) for n, p in phi.items()
    }
    curve: dict[int, Metrics] = {}
    moments = None
    for step in range(max(record_at) + 1):
        if step in record_at:
            with torch.no_grad():
                losses, metrics = loss(params, query)
            curve[step] = {"loss": losses.detach(), **{k: v.detach() for k, v in metrics.items()}}
        if step < max(record_at):
            with torch.enable_grad():
                params, moments = inner_step(loss, params, support, inner, names, False, moments)
                params = {n: p.detach().requires_grad_(n in names) for n, p in params.items()}
    return curve


def num_tasks(batch: Batch) -> int:
    """The size of the leading task dimension of a batched pytree."""
    return int(torch.utils._pytree.tree_leaves(batch)[0].shape[0])


def task_slice(batch: Batch, start: int, stop: int) -> Batch:
    """Tasks ``start:stop`` of a batched pytree (a view, no copy)."""
    return torch.utils._pytree.tree_map(lambda t: t[start:stop], batch)


def metric_sums(losses: Tensor, metrics: Metrics) -> Metrics:
    """Per-task losses and metrics summed over tasks, detached, as a Contribution carries them."""
    return {"loss": losses.detach().sum(), **{k: v.detach().sum() for k, v in metrics.items()}}
