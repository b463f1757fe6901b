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
of ``v`` has arrived. A recomputed slice (a restarted worker, or a step redone after a
non-finite slice) rewrites its buffer with the same values where the compute is
deterministic (CPU), with another valid computation of them otherwise.

The driver creates the folder, holds a lock on it while the run lasts and removes it when the
run closes; a folder whose lock nobody holds (its driver was killed) is removed by the next
run on that machine.
"""
from __future__ import annotations

import fcntl
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
    elements as ``contributions`` says slices travel (``runtime.contributions``: fp32 or bf16),
    and Φ in float32."""

    folder: str
    slices: int
    size: int
    contributions: str

    @property
    def storage(self) -> np.dtype:
        """The numpy dtype that holds a slice (bfloat16, which numpy lacks, as its int16 bits)."""
        return np.dtype(np.int16 if self.contributions == "bf16" else np.float32)


class SlotRef(NamedTuple):
    """A slice pushed through its buffer (that of its slice index): everything of a
    ``FlatContribution`` but the buffer."""

    num_tasks: int
    metrics: dict[str, float]


def available() -> bool:
    return ROOT.is_dir() and os.access(ROOT, os.W_OK)


_held: dict[str, int] = {}  # folder → the descriptor of its lock, held by the creating process


def create(slices: int, size: int, contributions: str) -> SlotSpec:
    """The buffers of a new run (zero-filled, of full size, so a full /dev/shm fails here and
    not mid-run), after removing the folders of drivers that no longer run. This process
    holds the folder's lock until ``remove``.

    Raises:
        OSError: /dev/shm cannot hold them.
    """
    remove_orphans()
    folder = ROOT / f"{PREFIX}{uuid.uuid4().hex}"
    folder.mkdir(mode=0o700)
    spec = SlotSpec(str(folder), slices, size, contributions)
    try:
        _held[spec.folder] = os.open(folder / "lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(_held[spec.folder], fcntl.LOCK_EX | fcntl.LOCK_NB)
        for name, kind in [("phi", np.dtype(np.float32)), *((f"slice{i}", spec.storage) for i in range(slices))]:
            with (folder / name).open("wb") as handle:
                os.posix_fallocate(handle.fileno(), 0, size * kind.itemsize)
    except OSError:
        remove(spec)
        raise
    return spec


def remove(spec: SlotSpec) -> None:
    shutil.rmtree(spec.folder, ignore_errors=True)
    if (lock := _held.pop(spec.folder, None)) is not None:
        os.close(lock)


def remove_orphans() -> None:
    """Remove slot folders whose creator is gone (a driver that was killed): those whose lock
    can be taken. A lock, unlike a pid, means the same in every pid namespace that shares
    /dev/shm (containers started with the host's IPC)."""
    for folder in ROOT.glob(f"{PREFIX}*"):
        try:
            lock = os.open(folder / "lock", os.O_RDWR)
        except OSError:  # not ours to open, gone meanwhile, or still being created
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its run goes on
            continue
        else:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(lock)


class Slots:
    """One process's mapping of a run's buffers (numpy arrays over the files). Only the
    server writes Φ (``server=True``), only workers write slices."""

    def __init__(self, spec: SlotSpec, server: bool) -> None:
        folder, self.contributions = Path(spec.folder), spec.contributions
        self.phi = np.memmap(folder / "phi", dtype=np.float32, mode="r+" if server else "r", shape=(spec.size,))
        self.slices = [np.memmap(folder / f"slice{i}", dtype=spec.storage, mode="r" if server else "r+",
                                 shape=(spec.size,)) for i in range(spec.slices)]
