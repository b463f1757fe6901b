"""Executors: where contributions are computed. In-process here; Ray actors plug in beside it."""
from distmeta.runtime.local import Executor, LocalExecutor

__all__ = ["Executor", "LocalExecutor"]
