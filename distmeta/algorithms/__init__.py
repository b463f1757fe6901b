"""Meta-learning math as pure functions over parameter dicts: inner loops, outer objectives."""

from distmeta.algorithms.inner import InnerLoop, adapt, adaptation_curve
from distmeta.algorithms.meta import (
    ALGORITHMS,
    Algorithm,
    TaskLosses,
    build_algorithm,
    maml,
    pretrain,
    reptile,
)
from distmeta.algorithms.paths import PATHS, compiled, compute_contribution, sum_contributions

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "InnerLoop",
    "PATHS",
    "TaskLosses",
    "adapt",
    "adaptation_curve",
    "build_algorithm",
    "compiled",
    "compute_contribution",
    "maml",
    "pretrain",
    "reptile",
    "sum_contributions",
]
