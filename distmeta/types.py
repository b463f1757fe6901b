"""Shared type names, so every module speaks the same vocabulary."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from torch import Tensor

Params = dict[str, Tensor]
"""Named parameter tensors. Batched params carry a leading task dimension."""

Batch = Any
"""A pytree of tensors (tuple/dict of tensors) that a model's loss understands."""

Metrics = dict[str, Tensor]
"""Named scalar metrics; in a Contribution they are sums over tasks."""

LossFn = Callable[[Params, Batch], tuple[Tensor, Metrics]]
"""(params, batch) -> (scalar loss, metrics) for ONE task (no task dimension)."""

BatchedLossFn = Callable[[Params, Batch], tuple[Tensor, Metrics]]
"""(batched params, batched batch) -> (per-task losses (T,), per-task metrics (T,))."""


class NonFiniteError(FloatingPointError):
    """A loss, meta-gradient or Φ went NaN/infinite. In training Φ was not updated and the
    checkpoints are intact; in evaluation no score is reported (chance accuracy from NaN
    logits would look like a result)."""


class TaskBatch(NamedTuple):
    """Support and query data of T tasks, every leaf stacked along dim 0."""

    support: Batch
    query: Batch


class Contribution(NamedTuple):
    """What a slice of tasks adds to one outer step; slices are summed in task order.

    ``grad_sum`` holds the summed outer gradient of the slice's tasks (for Reptile the
    pseudo-gradient Φ − θ̂, so that SGD with learning rate ε is exactly Reptile's
    Φ ← Φ + ε·mean(θ̂ − Φ)). ``metrics`` are summed over tasks as well.
    """

    grad_sum: Params
    num_tasks: int
    metrics: Metrics
