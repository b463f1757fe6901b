"""Checkpoints: Φ, optimizer state and step, written atomically, the last few kept."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

PATTERN = re.compile(r"step_(\d+)\.pt$")


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``step_<step>.pt`` (temp file, fsync, rename) and prune all but the newest ``keep``.

    A crash mid-write leaves the previous checkpoints intact, never a truncated newest one.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:08d}.pt"
    temporary = directory / f".{final.name}.tmp"
    with open(temporary, "wb") as handle:
        torch.save({**state, "step": step}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    for old in checkpoints(directory)[:-keep]:
        old.unlink()
    return final


def checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files of a directory, oldest first."""
    directory = Path(directory)
    found = [p for p in directory.glob("step_*.pt") if PATTERN.search(p.name)] if directory.is_dir() else []
    return sorted(found, key=lambda p: int(PATTERN.search(p.name).group(1)))


def latest_checkpoint(directory: str | Path) -> Path:
    """The newest checkpoint.

    Raises:
        FileNotFoundError: the directory holds none.
    """
    found = checkpoints(directory)
    if not found:
        raise FileNotFoundError(f"no checkpoint (step_*.pt) in {directory}")
    return found[-1]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state on the CPU (``phi``, ``opt_state``, ``step``, ...)."""
    return torch.load(path, map_location="cpu", weights_only=True)
