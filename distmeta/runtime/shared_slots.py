"""Fixed shared-memory buffers for sync steps whose workers share the parameter server's node.

A ``ray.put`` of a Φ-sized buffer copies it into memory that the object store hands out, often
memory that must be faulted in afresh: 4-23 ms for 40 MB on the 2-core machine, against 3 ms
for a copy into memory already mapped. A sync step makes one such put per slice and one for Φ,
so on one node the object store, not the arithmetic, was most of a 10M-parameter step
(``bench/ray_runtime.py`` case 3 measures both ways side by side). Here each slice index has
one file-backed buffer in ``/dev/shm`` for the whole run, and so does Φ: a worker writes its
slice into its buffer and pushes only the small rest; the server sums the buffers in place and
writes the new Φ into the Φ buffer that the workers read.

Safe only in sync mode: slice ``i`` of step ``v + 1`` cannot be computed before step ``v`` has
been applied (it needs Φ ``v + 1``), and Φ is only rewritten by that apply, after every slice
of ``v`` has arrived. A retried slice rewrites its buffer with the same values.

The driver creates the folder and removes it when the run closes; folders left by a driver
that was killed are removed by the next run on that machine (their name holds the driver's pid).
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path("/dev/shm")
PREFIX = "distmeta-slots-"


class SlotSpec(NamedTuple):
    """Where a run's buffers are and their shape: ``slices`` slice buffers of ``size``
    elements of ``dtype`` (the slices' torch dtype on the wire), and Φ in float32."""

    folder: str
    slices: int
    size: int
    dtype: str

    @property
    def storage(self) -> np.dtype:
        """The numpy dtype that holds a slice (bfloat16, which numpy lacks, as its int16 bits)."""
        return np.dtype("int16" if self.dtype == "bfloat16" else self.dtype)


class SlotRef(NamedTuple):
    """A slice pushed through its buffer (that of its slice index): everything of a
    ``FlatContribution`` but the buffer."""

    num_tasks: int
    metrics: dict[str, float]


def available() -> bool:
    return ROOT.is_dir() and os.access(ROOT, os.W_OK)


def create(slices: int, size: int, dtype: str) -> SlotSpec:
    """The buffers of a new run (zero-filled, of full size, so a full /dev/shm fails here and
    not mid-run), after removing the folders of drivers that no longer run."""
    remove_orphans()
    folder = ROOT / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(mode=0o700)
    spec = SlotSpec(str(folder), slices, size, dtype)
    try:
        for name, kind in [("phi", np.dtype(np.float32)), *((f"slice{i}", spec.storage) for i in range(slices))]:
            with (folder / name).open("wb") as handle:
                os.posix_fallocate(handle.fileno(), 0, size * kind.itemsize)
    except OSError:
        remove(spec)
        raise
    return spec


def remove(spec: SlotSpec) -> None:
    shutil.rmtree(spec.folder, ignore_errors=True)


def remove_orphans() -> None:
    """Remove slot folders whose creating process is gone (a driver that was killed)."""
    for folder in ROOT.glob(f"{PREFIX}*"):
        pid = int(folder.name.removeprefix(PREFIX).split("-")[0])
        if folder.stat().st_uid == os.getuid() and not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Slots:
    """One process's mapping of a run's buffers (numpy arrays over the files). Only the
    server writes Φ (``server=True``), only workers write slices."""

    def __init__(self, spec: SlotSpec, server: bool) -> None:
        folder, self.dtype = Path(spec.folder), spec.dtype
        self.phi = np.memmap(folder / "phi", dtype=np.float32, mode="r+" if server else "r", shape=(spec.size,))
        self.slices = [np.memmap(folder / f"slice{i}", dtype=spec.storage, mode="r" if server else "r+",
                                 shape=(spec.size,)) for i in range(spec.slices)]
