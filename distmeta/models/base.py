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


def check_params(reference: Params, given: Params, what: str) -> None:
    """Raises ValueError naming each parameter that ``given`` (e.g. a checkpoint's Φ) lacks,
    adds, or shapes differently from ``reference`` (the model's own), before a flat copy could
    silently reshape one into the other."""
    problems = [f"{name} missing" for name in reference if name not in given]
    problems += [f"{name} not in the model" for name in given if name not in reference]
    problems += [f"{name} is {tuple(given[name].shape)}, the model's is {tuple(value.shape)}"
                 for name, value in reference.items() if name in given and given[name].shape != value.shape]
    if problems:
        raise ValueError(f"{what} does not fit the job's model: {'; '.join(problems[:5])}"
                         + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))


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
