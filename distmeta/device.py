"""Device and precision: where tensors live and whether matrix work runs in bf16."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import torch
from torch.utils._pytree import tree_map

from distmeta.types import TaskBatch

# glibc hands every freed buffer over 32 MiB back to the OS, so each big temporary (a Φ-sized
# buffer, a meta-batch's activations) page-faults afresh; keeping them in the heap makes a
# 10M-parameter Adam step 160 → 33 ms and an Omniglot second-order MAML step (Q = 15) ~1.3×
# faster. Read by glibc at process start only: Ray actors get it in their environment, and the
# ``distmeta`` command and the benchmarks restart themselves once with it.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32)}


def restart_with_allocator_env() -> None:
    """Restart this process once, with the command line it was started with, and
    ``ALLOCATOR_ENV`` added to its environment (values the user set are kept); returns when
    nothing is missing, or when the process cannot be restarted (it then runs without)."""
    missing = {k: v for k, v in ALLOCATOR_ENV.items() if k not in os.environ}
    if missing and sys.platform.startswith("linux") and sys.executable:
        with contextlib.suppress(OSError):
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **missing})


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU.

    Raises:
        ValueError: ``cuda`` asked for where there is none.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device is 'cuda' but torch sees no CUDA device")
    return torch.device(name)


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast (parameters, their gradients and the loss stay fp32) or nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def tree_to(tree: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """A pytree (dicts, tuples, ...) with every tensor moved to ``device``; other leaves kept.
    ``non_blocking`` only where nothing reads the result on the host before the device does."""
    return tree_map(lambda v: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v, tree)


def to_device(tasks: TaskBatch, device: torch.device) -> TaskBatch:
    """A task batch with every tensor moved to ``device``."""
    return TaskBatch(*tree_to(tuple(tasks), device, non_blocking=True))
