"""Executors: where contributions are computed. In-process here; Ray actors plug in beside it."""
from distmeta.runtime.local import Executor, LocalExecutor, resolve_device

__all__ = ["Executor", "LocalExecutor", "resolve_device"]
