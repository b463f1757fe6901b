"""The in-process executor: samples a meta-step's tasks and computes their contribution.

An executor is the seam between the training loop and where the math runs. This one runs
in the calling process; a distributed executor splits the same meta-batch into task slices,
computes each slice's contribution elsewhere with the same functions, and sums them in order.
"""
from __future__ import annotations

import logging
import time
from typing import Protocol

import torch

from distmeta.algorithms import Algorithm, compiled, compute_contribution
from distmeta.data.sampling import TaskSampler
from distmeta.device import precision_context, to_device
from distmeta.models import TaskModel
from distmeta.types import Contribution, Params, TaskBatch

log = logging.getLogger("distmeta.runtime")

AUTO_CANDIDATES = ("batched", "loop")


class Executor(Protocol):
    """Computes the contribution of meta-step ``step``'s tasks ``0..meta_batch-1`` at Φ."""

    def contribution(self, phi: Params, step: int, meta_batch: int) -> Contribution: ...


class LocalExecutor:
    """Runs the algorithm on this process's device, choosing the fastest path if asked."""

    def __init__(self, model: TaskModel, algorithm: Algorithm, sampler: TaskSampler, path: str = "auto",
                 precision: str = "fp32", device: torch.device | str = "cpu", compile: bool = False) -> None:
        """``compile`` runs the batched path with a compiled loss (``path`` auto then means batched)."""
        self.model, self.algorithm, self.sampler = model, algorithm, sampler
        self.precision, self.device = precision, torch.device(device)
        self.path = "batched" if compile else path
        self.compiled_loss = compiled(model.batched_loss) if compile else None

    def tasks(self, step: int, start: int, stop: int) -> TaskBatch:
        return to_device(self.sampler.sample("train", step, start, stop), self.device)

    def contribution(self, phi: Params, step: int, meta_batch: int) -> Contribution:
        return self.slice_contribution(phi, step, 0, meta_batch)

    def slice_contribution(self, phi: Params, step: int, start: int, stop: int) -> Contribution:
        """The contribution of tasks ``start..stop-1`` of meta-step ``step`` (what a worker computes)."""
        tasks = self.tasks(step, start, stop)
        if self.path == "auto":
            self.path = self._fastest_path(phi, tasks)
        with precision_context(self.precision, self.device):
            return compute_contribution(self.algorithm, self.model, phi, tasks, self.path, self.compiled_loss)

    def _fastest_path(self, phi: Params, tasks: TaskBatch, repeats: int = 2) -> str:
        """Time each candidate path on real tasks (after a warm-up) and keep the fastest."""
        timings = {}
        for path in AUTO_CANDIDATES:
            with precision_context(self.precision, self.device):
                compute_contribution(self.algorithm, self.model, phi, tasks, path)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                start = time.perf_counter()
                for _ in range(repeats):
                    compute_contribution(self.algorithm, self.model, phi, tasks, path)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
            timings[path] = (time.perf_counter() - start) / repeats
        best = min(timings, key=timings.get)
        log.info("path auto: %s (%s)", best, ", ".join(f"{p} {t * 1000:.0f} ms/step" for p, t in timings.items()))
        return best
