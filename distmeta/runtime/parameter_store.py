"""Φ and the outer optimizer as one flat buffer that applies summed task-slice contributions.

The aggregation rules of the parameter server, without Ray, so the in-process run and the
parameter-server actor apply the same arithmetic and both can be tested directly:

* ``sync``: a step is applied once every slice of that step has arrived, summed in slice
  (task) order, so Φ does not depend on how many workers computed the slices or when.
* ``async``: slices are summed in arrival order as they come, and a step is applied as soon
  as a meta-batch worth of tasks has arrived; a slice computed at a Φ more than
  ``staleness`` versions old is dropped and counted.

Either way a non-finite slice is rejected and counted, never applied.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch

from distmeta.models.base import check_params
from distmeta.optim import Optimizer
from distmeta.types import Contribution, NonFiniteError, Params

MODES = ("sync", "async")
WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # runtime.contributions: what slices travel as


def to_wire(flat: torch.Tensor) -> np.ndarray:
    """A flat CPU buffer as the numpy view Ray moves without copies (pickle-5 out-of-band
    buffers). Torch tensors are copied on each side instead: 98 ms vs 6 ms to pass 10M floats
    to an actor on this machine. bfloat16, which numpy lacks, travels as its int16 bits."""
    flat = flat.detach().cpu().contiguous()
    return (flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat).numpy()


def from_wire(array: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor over ``array`` without a copy. What ``ray.get`` returns is a read-only view of
    the object store: the tensor must never be written in place (nothing here does)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(array).view(dtype)


class FlatContribution(NamedTuple):
    """A slice's contribution as it travels: the summed gradient as one flat buffer, pickled
    zero-copy (``to_wire``), so that a push costs no copy of the buffer on either side."""

    grad_sum: torch.Tensor
    num_tasks: int
    metrics: dict[str, float]  # sums over the slice's tasks

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        dtype = str(self.grad_sum.dtype).removeprefix("torch.")
        return _contribution_from_wire, (to_wire(self.grad_sum), dtype, self.num_tasks, self.metrics)


def _contribution_from_wire(grad_sum: np.ndarray, dtype: str, num_tasks: int, metrics: dict[str, float]) -> FlatContribution:
    return FlatContribution(from_wire(grad_sum, getattr(torch, dtype)), num_tasks, metrics)


class StepRecord(NamedTuple):
    """What one applied step was made of (for the driver's logs)."""

    step: int
    num_tasks: int
    metrics: dict[str, float]  # sums over the step's tasks


class FlatLayout(NamedTuple):
    """Names and shapes of parameters in their canonical (model) order, to move between
    a parameter dict and one flat buffer."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, params: Params) -> "FlatLayout":
        return cls(tuple(params), tuple(tuple(p.shape) for p in params.values()))

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    def flatten(self, params: Params) -> torch.Tensor:
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> Params:
        """Views into ``flat`` (no copy)."""
        return {n: part.view(s) for n, s, part in zip(self.names, self.shapes, flat.split(self.sizes))}

    def flatten_contribution(self, contribution: Contribution) -> FlatContribution:
        return FlatContribution(self.flatten(contribution.grad_sum), contribution.num_tasks,
                                {k: float(v) for k, v in contribution.metrics.items()})

    def non_finite_names(self, flat: torch.Tensor) -> list[str]:
        """The parameters that ``_finite`` rejects: a NaN or inf, or a sum that overflows."""
        return [n for n, part in self.unflatten(flat).items() if not _finite(part)]


class ParameterStore:
    """Φ (one flat float32 buffer for float32 models), the optimizer state, the version (= steps applied) and the
    aggregation of contributions into steps."""

    def __init__(self, phi: Params, optimizer: Optimizer, meta_batch: int, slices: int = 1, mode: str = "sync",
                 staleness: int = 0, state: dict[str, Any] | None = None) -> None:
        """``state``: a ``state_dict()`` to continue from (a checkpoint), else start at ``phi``.

        Raises:
            ValueError: unknown mode, or a ``state`` whose Φ does not fit ``phi``'s names and shapes.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        self.layout, self.optimizer = FlatLayout.of(phi), optimizer
        self.meta_batch, self.slices, self.mode, self.staleness = meta_batch, slices, mode, staleness
        if state is None:
            self.flat = self.layout.flatten(phi).clone()
            self.opt_state = optimizer.init({"phi": self.flat})
            self.version, self.tickets, self.rejected, self.stale = 0, 0, 0, 0
        else:
            check_params(phi, state["phi"], "the checkpoint's Φ")
            self.flat = self.layout.flatten(state["phi"]).clone()
            self.opt_state = {k: {"phi": self.layout.flatten(v)} if isinstance(v, dict) else v
                              for k, v in state["opt_state"].items()}
            self.version = int(state["step"])
            # Tickets resume at a step boundary, so a resume with another slice count skips no task.
            self.tickets = int(state.get("sampler", {}).get("next_ticket_step", self.version)) * slices
            self.rejected, self.stale = int(state.get("rejected", 0)), int(state.get("stale", 0))
        self.failure: str | None = None  # why this store may no longer be used or saved
        self.records: list[StepRecord] = []
        self._parts: dict[int, FlatContribution] = {}  # sync: this step's slices by index
        self._prefix: FlatContribution | None = None  # sync: the sum of slices 0..k-1 of this step, once all are in
        self._prefix_count = 0  # k
        self._pending: FlatContribution | None = None  # async: the running sum towards the next step

    def phi(self) -> Params:
        return self.layout.unflatten(self.flat)

    def keep_phi_in(self, buffer: torch.Tensor) -> None:
        """Hold Φ in ``buffer`` from now on (a flat float32 buffer of Φ's size): the in-place
        apply then updates it there, where others may read it without a copy."""
        buffer.copy_(self.flat)
        self.flat = buffer

    def ticket(self) -> tuple[int, int]:
        """The next (step, slice index) of the task stream for an async worker to compute."""
        ticket, self.tickets = self.tickets, self.tickets + 1
        return divmod(ticket, self.slices)

    def submit(self, version: int, index: int, part: FlatContribution) -> str:
        """Take slice ``index`` computed at Φ version ``version``.

        Returns one of ``applied`` (this slice completed a step), ``pending`` (kept, the
        step waits for more), ``duplicate`` (a retried slice already here; ignored),
        ``stale`` (computed at a Φ this store no longer accepts; dropped) or ``rejected``
        (non-finite: dropped; in sync mode, said when the step's last slice arrives, and the
        step waits for the non-finite slices again).

        Raises:
            NonFiniteError: the update itself made Φ non-finite, now or at an earlier submit.
        """
        self._check_usable()
        if not all(math.isfinite(v) for v in part.metrics.values()):
            self.rejected += 1
            return "rejected"
        if self.mode == "sync":
            if version != self.version:
                return "stale"
            if index in self._parts:
                return "duplicate"
            self._parts[index] = part
            self._extend_prefix()
            if len(self._parts) < self.slices:
                return "pending"
            total = self._prefix
            if not _finite(total.grad_sum):  # one pass over the sum instead of one per slice
                return self._reject_non_finite_parts()
            self._parts, self._prefix, self._prefix_count = {}, None, 0
            return self._apply(total, owned=self.slices > 1 and total.grad_sum.dtype == self.flat.dtype)
        if not _finite(part.grad_sum):
            self.rejected += 1
            return "rejected"
        if not 0 <= self.version - version <= self.staleness:  # too old, or from before a restart
            self.stale += 1
            return "stale"
        self._pending = part if self._pending is None else _add(self._pending, part, owned=False)
        if self._pending.num_tasks < self.meta_batch:
            return "pending"
        total, self._pending = self._pending, None
        return self._apply(total, owned=total is not part and total.grad_sum.dtype == self.flat.dtype)

    def _extend_prefix(self) -> None:
        """Add the slices that now continue the prefix of slices in task order: most of a
        step's sum is done while its last slices are still on their way, and it is the same
        left-to-right sum as when all are summed at the end."""
        while self._prefix_count in self._parts:
            part = self._parts[self._prefix_count]
            self._prefix = part if self._prefix is None else _add(self._prefix, part, owned=self._prefix_count > 1)
            self._prefix_count += 1

    def _reject_non_finite_parts(self) -> str:
        """Drop the step's non-finite slices (all of them if each is finite but their sum
        overflows), so that the step waits for those to be recomputed."""
        bad = [i for i, part in self._parts.items() if not _finite(part.grad_sum)] or list(self._parts)
        for i in bad:
            del self._parts[i]
        self.rejected += len(bad)
        self._prefix, self._prefix_count = None, 0
        self._extend_prefix()
        return "rejected"

    def _apply(self, total: FlatContribution, owned: bool) -> str:
        """``owned``: ``total`` is a sum made here, which the update may overwrite (dividing it
        by the task count in its own pass); otherwise it is a part, which is never written."""
        # Φ and the moments are updated in place (a 10M-parameter Adam step in a third of the
        # time); so a non-finite result leaves this store unusable rather than unchanged.
        if owned:
            new_phi, new_state = self.optimizer.update({"phi": self.flat}, {"phi": total.grad_sum}, self.opt_state,
                                                       donate=True, grad_scale=total.num_tasks)
        else:
            grads = total.grad_sum.to(self.flat.dtype) / total.num_tasks
            new_phi, new_state = self.optimizer.update({"phi": self.flat}, {"phi": grads}, self.opt_state, donate=True)
        if not _finite(new_phi["phi"]):
            bad = ", ".join(self.layout.non_finite_names(new_phi["phi"])) or "the sum of all (it overflows float32)"
            self.failure = (f"non-finite updated Φ at step {self.version} in {bad}; the run stops and the "
                            "checkpoints, all from before this step, are intact. Lower optimizer.lr.")
            self._check_usable()
        self.flat, self.opt_state = new_phi["phi"], new_state
        self.records.append(StepRecord(self.version, total.num_tasks, total.metrics))
        self.version += 1
        return "applied"

    def take_records(self) -> list[StepRecord]:
        """The steps applied since the last call."""
        records, self.records = self.records, []
        return records

    def _check_usable(self) -> None:
        if self.failure is not None:
            raise NonFiniteError(self.failure)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds, with Φ and the optimizer moments as named parameters.

        Raises:
            NonFiniteError: an update made Φ non-finite (such a state is never saved).
        """
        self._check_usable()
        return {
            "phi": {n: t.clone() for n, t in self.phi().items()},
            "opt_state": {k: self.layout.unflatten(v["phi"].clone()) if isinstance(v, dict) else v
                          for k, v in self.opt_state.items()},
            "step": self.version,
            "sampler": {"next_step": self.version,  # async: the first step none of whose tasks was handed out
                        "next_ticket_step": -(-self.tickets // self.slices) if self.mode == "async" else self.version},
            "rejected": self.rejected,
            "stale": self.stale,
        }


def _finite(flat: torch.Tensor) -> bool:
    """No NaN or inf (a NaN or inf anywhere makes the sum one); 30× cheaper than
    ``isfinite().all()`` on a large buffer. A finite buffer whose sum overflows counts as
    non-finite, which no sane gradient or Φ reaches."""
    return bool(torch.isfinite(flat.sum()))


def _add(total: FlatContribution, part: FlatContribution, owned: bool) -> FlatContribution:
    """``total`` + ``part`` in float32 (parts may travel as bfloat16), left to right so that the
    float sum is reproducible: into ``total``'s buffer when it is ``owned`` (a sum made here),
    else into a new one. Never writes into a part (a part may be a read-only view
    of Ray's object store or of a shared buffer)."""
    grad = total.grad_sum.add_(part.grad_sum) if owned else total.grad_sum.float() + part.grad_sum
    metrics = dict(total.metrics)
    for k, v in part.metrics.items():
        metrics[k] = metrics.get(k, 0.0) + v
    return FlatContribution(grad, total.num_tasks + part.num_tasks, metrics)
