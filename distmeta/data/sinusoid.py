"""The sinusoid regression toy of Finn et al. (2017): y = A·sin(x − φ), A ∈ U[0.1, 5],
φ ∈ U[0, π], x ∈ U[−5, 5]."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distmeta.data.sampling import task_rng
from distmeta.types import TaskBatch

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, np.pi)
X_RANGE = (-5.0, 5.0)


@dataclass(frozen=True)
class SinusoidTasks:
    """K support and Q query points per task; counter-based like every sampler."""

    shots: int
    queries: int
    seed: int = 0

    def curve(self, split: str, step: int, index: int) -> tuple[float, float]:
        """Amplitude and phase of one task, for plotting its true curve."""
        rng = task_rng(self.seed, split, step, index)
        return float(rng.uniform(*AMPLITUDE)), float(rng.uniform(*PHASE))

    def sample(self, split: str, step: int, start: int, stop: int) -> TaskBatch:
        """Tasks ``start..stop-1``: x and y tensors of shape (T, K or Q, 1)."""
        xs, ys = [], []
        for index in range(start, stop):
            rng = task_rng(self.seed, split, step, index)
            amplitude, phase = rng.uniform(*AMPLITUDE), rng.uniform(*PHASE)
            x = rng.uniform(*X_RANGE, size=(self.shots + self.queries, 1))
            xs.append(x)
            ys.append(amplitude * np.sin(x - phase))
        x = torch.from_numpy(np.stack(xs)).float()
        y = torch.from_numpy(np.stack(ys)).float()
        k = self.shots
        return TaskBatch((x[:, :k], y[:, :k]), (x[:, k:], y[:, k:]))
