"""Checkpoints: Φ, optimizer state, step and sampler state, written atomically, the last few kept."""
from __future__ import annotations

import io
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from distmeta.storage import Location

PATTERN = re.compile(r"^step_(\d+)\.pt$")


def save_checkpoint(directory: str | Path | Location, step: int, state: dict[str, Any], keep: int) -> Location:
    """Write ``step_<step>.pt`` atomically (see ``Location.write_bytes``) and prune all but
    the newest ``keep``: a crash mid-write leaves the previous checkpoints intact."""
    directory = Location(directory)
    buffer = io.BytesIO()
    torch.save({**state, "step": step}, buffer)
    final = directory / f"step_{step:08d}.pt"
    final.write_bytes(buffer.getvalue())
    for old in checkpoints(directory)[:-keep]:
        old.delete()
    return final


def checkpoints(directory: str | Path | Location) -> list[Location]:
    """Checkpoint files of a directory, oldest first."""
    directory = Location(directory)
    names = sorted((n for n in directory.listdir() if PATTERN.match(n)), key=lambda n: int(PATTERN.match(n).group(1)))
    return [directory / n for n in names]


def checkpoint_step(path: Location) -> int:
    """The step a checkpoint file holds, from its name."""
    return int(PATTERN.match(path.name).group(1))


def latest_checkpoint(directory: str | Path | Location) -> Location:
    """The newest checkpoint.

    Raises:
        FileNotFoundError: the directory holds none.
    """
    found = checkpoints(directory)
    if not found:
        raise FileNotFoundError(f"no checkpoint (step_*.pt) in {Location(directory)}")
    return found[-1]


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read back (truncated, overwritten, not ours)."""


def load_checkpoint(path: str | Path | Location) -> dict[str, Any]:
    """A checkpoint's state on the CPU (``phi``, ``opt_state``, ``step``, ...).

    Raises:
        CorruptCheckpointError: the file is not a readable checkpoint (names it; the file is
            left in place, as are the older ones).
    """
    path = Location(path)
    data = path.read_bytes()
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, struct.error, pickle.UnpicklingError,
            zipfile.BadZipFile) as error:  # what torch raises depends on where the file is broken
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if "Unsupported global" in str(error):  # whole, but holds objects distmeta never saves
            reason = "it holds objects other than tensors and plain values, so it is not a distmeta checkpoint"
        elif "Weights only load failed" in str(error):
            reason = "not a PyTorch checkpoint (unreadable bytes)"
        raise CorruptCheckpointError(f"checkpoint {path} ({len(data)} bytes) cannot be read: {reason}. Move it "
                                     "out of checkpoints/ to resume from the one before it") from None
