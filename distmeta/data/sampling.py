"""Counter-based task sampling: task ``index`` of meta-step ``step`` under run seed ``seed``
is a pure function of those numbers, so any process (a worker, a resumed run) regenerates
exactly the same tensors without shipping them or carrying RNG state."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from distmeta.types import TaskBatch

SPLITS = ("train", "val", "test")


def task_rng(seed: int, split: str, step: int, index: int) -> np.random.Generator:
    """The generator of one task: a SeedSequence over (seed, split, step, index).

    Raises:
        ValueError: unknown split, or a negative counter.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if min(seed, step, index) < 0:
        raise ValueError(f"seed, step and index must be >= 0, got {(seed, step, index)}")
    return np.random.default_rng([seed, SPLITS.index(split), step, index])


class TaskSampler(Protocol):
    """What executors need from task data: a batch of tasks by counter."""

    def sample(self, split: str, step: int, start: int, stop: int) -> TaskBatch:
        """Tasks ``start..stop-1`` of meta-step ``step`` of ``split``, stacked on dim 0."""
        ...
