"""How a slice of tasks is evaluated: hand-batched, ``vmap``-batched, or one task at a time.

All three compute the same Contribution (tests hold them to 1e-5); which is fastest depends
on the device and the sizes, so ``auto`` times the batched path against the loop on real
tasks (``distmeta.runtime.local``; vmap was never the faster of the two in the benchmarks).
The per-task loop is the reference implementation.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from distmeta.algorithms.inner import num_tasks, task_slice
from distmeta.algorithms.meta import Algorithm, TaskLosses
from distmeta.models.base import TaskModel, vmapped
from distmeta.types import Batch, BatchedLossFn, Contribution, LossFn, Metrics, Params, TaskBatch

PATHS = ("batched", "vmap", "loop")


def one_task_at_a_time(loss: LossFn) -> BatchedLossFn:
    """Lift a per-task loss to the batched signature for a slice of exactly one task."""

    def batched(params: Params, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        value, metrics = loss(tree_map(lambda t: t[0], params), tree_map(lambda t: t[0], batch))
        return value.unsqueeze(0), {k: v.unsqueeze(0) for k, v in metrics.items()}

    return batched


def sum_contributions(parts: list[Contribution]) -> Contribution:
    """Add contributions in the given (task) order, so the float sum is reproducible."""
    first, *rest = parts
    grad_sum = {n: g.clone() for n, g in first.grad_sum.items()}
    metrics = {k: v.clone() for k, v in first.metrics.items()}
    for part in rest:
        for n, g in part.grad_sum.items():
            grad_sum[n] += g
        for k, v in part.metrics.items():
            metrics[k] += v
    return Contribution(grad_sum, sum(p.num_tasks for p in parts), metrics)


def compiled(loss: BatchedLossFn) -> BatchedLossFn:
    """``torch.compile`` of a batched loss for fixed shapes: fuses batch norm's elementwise
    work, which dominates conv4 on CPUs. First derivatives only (no double backward)."""
    return torch.compile(loss, dynamic=False)


def compute_contribution(algorithm: Algorithm, model: TaskModel, phi: Params, tasks: TaskBatch,
                         path: str, compiled_loss: BatchedLossFn | None = None) -> Contribution:
    """The algorithm's contribution of ``tasks`` by the chosen evaluation path.

    ``compiled_loss`` (from ``compiled(model.batched_loss)``, kept by the caller so it
    compiles once) serves the batched path wherever only first derivatives are needed.

    Raises:
        ValueError: unknown path, or a compiled loss for another path than ``batched``.
    """
    if compiled_loss is not None and path != "batched":
        raise ValueError(f"a compiled loss serves only the batched path, not {path!r}")
    if path == "batched":
        outer = compiled_loss or model.batched_loss
        inner = model.batched_loss if algorithm.second_order else outer
        return algorithm.contribution(TaskLosses(inner, outer), phi, tasks)
    if path == "vmap":
        loss = vmapped(model.loss)
        return algorithm.contribution(TaskLosses(loss, loss), phi, tasks)
    if path == "loop":
        per_task = one_task_at_a_time(model.loss)
        parts = [algorithm.contribution(TaskLosses(per_task, per_task), phi,
                                        TaskBatch(*(task_slice(b, i, i + 1) for b in tasks)))
                 for i in range(num_tasks(tasks.support))]
        return sum_contributions(parts)
    raise ValueError(f"unknown path {path!r}; choose one of {PATHS}")
