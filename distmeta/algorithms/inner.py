"""Inner-loop adaptation: SGD on each task's support set, all tasks at once.

Params here are batched (leading task dimension). Tasks are independent, so the gradient of
the SUM of per-task losses with respect to batched params is every task's own gradient.
"""

from __future__ import annotations

from fnmatch import fnmatch
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from distmeta.types import Batch, BatchedLossFn, Metrics, Params


class InnerLoop(NamedTuple):
    """How a task adapts: ``steps`` SGD steps of size ``lr`` on the parameters that match
    one of the ``adapt`` name patterns (fnmatch, e.g. ``("head.*",)`` for ANIL)."""

    lr: float
    steps: int
    adapt: tuple[str, ...] = ("*",)


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


def sgd_step(
    loss: BatchedLossFn, params: Params, support: Batch, lr: float, names: Sequence[str], create_graph: bool
) -> Params:
    """One inner SGD step for every task. ``create_graph`` keeps second-order terms."""
    losses, _ = loss(params, support)
    grads = torch.autograd.grad(losses.sum(), [params[n] for n in names], create_graph=create_graph)
    return {**params, **{n: params[n] - lr * g for n, g in zip(names, grads)}}


def adapt(
    loss: BatchedLossFn, params: Params, support: Batch, inner: InnerLoop, create_graph: bool
) -> Params:
    """θ̂ = Φ after ``inner.steps`` SGD steps on each task's support set."""
    names = adapted_names(params, inner.adapt)
    for _ in range(inner.steps):
        params = sgd_step(loss, params, support, inner.lr, names, create_graph)
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
    for step in range(max(record_at) + 1):
        if step in record_at:
            with torch.no_grad():
                losses, metrics = loss(params, query)
            curve[step] = {"loss": losses.detach(), **{k: v.detach() for k, v in metrics.items()}}
        if step < max(record_at):
            with torch.enable_grad():
                params = {
                    n: p.detach().requires_grad_(n in names)
                    for n, p in sgd_step(loss, params, support, inner.lr, names, False).items()
                }
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
