"""The contract between models and algorithms: a model is init + per-task loss (+ batched loss)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from distmeta.types import Batch, BatchedLossFn, LossFn, Metrics, Params


class TaskModel(NamedTuple):
    """A model as pure functions, so algorithms can adapt any parameter dict.

    ``loss`` is the per-task reference (one task, no task dimension). ``batched_loss``
    takes params and data with a leading task dimension and returns per-task losses and
    metrics; it must equal ``vmap(loss)`` and exists so a model can supply a faster
    hand-batched form (e.g. grouped convolutions) than what ``vmap`` generates.
    """

    name: str
    init: Callable[[torch.Generator], Params]
    loss: LossFn
    batched_loss: BatchedLossFn


def vmapped(loss: LossFn) -> BatchedLossFn:
    """The generic batched form of a per-task loss: ``torch.func.vmap`` over tasks."""
    return torch.func.vmap(loss, in_dims=(0, 0))


def classification_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Metrics]:
    """Mean cross-entropy over a task's examples, with accuracy as a metric."""
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return loss, {"accuracy": accuracy}


def regression_loss(predictions: Tensor, targets: Tensor) -> tuple[Tensor, Metrics]:
    """Mean squared error over a task's examples (the metric repeats it as ``mse``)."""
    mse = ((predictions - targets) ** 2).mean()
    return mse, {"mse": mse.detach()}


def split_xy(batch: Batch) -> tuple[Tensor, Tensor]:
    """Supervised batches are ``(inputs, targets)`` pairs."""
    inputs, targets = batch
    return inputs, targets
