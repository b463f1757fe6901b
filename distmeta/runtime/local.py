"""In-process meta-training: the executor that computes a slice's contribution, and the
runtime that applies whole meta-batches to a local parameter store.

A runtime is the seam between the training loop and where the math runs. ``LocalRuntime``
does everything in the calling process; ``RayRuntime`` splits each meta-batch into task
slices computed by worker actors (each with a ``LocalExecutor``) and applied by a
parameter-server actor (with the same ``ParameterStore``).
"""
from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import Future
from typing import Any, Protocol

import torch

from distmeta.algorithms import Algorithm, compiled, compute_contribution
from distmeta.checkpoint import save_checkpoint
from distmeta.components import build_job_algorithm, build_job_optimizer, build_model, build_sampler
from distmeta.config import JobConfig, job_to_dict
from distmeta.data.sampling import TaskSampler
from distmeta.device import precision_context, to_device, tree_to
from distmeta.evaluate import JobEvaluator
from distmeta.models import TaskModel
from distmeta.runtime.parameter_store import NonFiniteError, ParameterStore, StepRecord
from distmeta.storage import Location
from distmeta.types import Contribution, Params, TaskBatch

log = logging.getLogger("distmeta.runtime")

AUTO_CANDIDATES = ("batched", "loop")


class Rewound(Exception):
    """The parameter server restarted from its checkpoint at ``step``; later steps are redone."""

    def __init__(self, step: int, lost: int) -> None:
        super().__init__(f"parameter server restarted from its checkpoint at step {step}; {lost} step(s) to redo")
        self.step, self.lost = step, lost


class Runtime(Protocol):
    """Where a run's steps are computed and applied, as the training loop sees it."""

    version: int  # steps applied so far
    path: str | None  # the executor path the steps run on

    def advance(self) -> list[StepRecord]:
        """Apply at least one more step (exactly one in sync mode) and say what was applied.

        Raises:
            Rewound: the applied state went back to a checkpoint (the loop rewinds its logs).
        """

    def finish(self) -> list[StepRecord]:
        """Stop computing steps (async workers end their loops; a sync step that Ctrl-C
        interrupted on Ray is waited for); the steps applied meanwhile."""

    def validate(self) -> Future:
        """Meta-validation of the current Φ: a future of ``{"val_<metric>": ...}``."""

    def test(self) -> dict[str, float]:
        """The final meta-test report of the current Φ."""

    def checkpoint(self, extra: dict[str, Any]) -> None:
        """Save Φ, optimizer and sampler state at the current step, plus the driver's ``extra``.

        Raises:
            Rewound: the server restarted from an earlier checkpoint since the last step;
                nothing was written (its state would not match ``extra``).
        """

    def info(self) -> dict[str, Any]:
        """Summary fields: mode, phi_sha256, restarts, rejected_contributions, ..."""

    def close(self) -> None: ...


def initial_phi(job: JobConfig, model: TaskModel) -> Params:
    """Φ at step 0: the model's initialisation from the job's seed."""
    return model.init(torch.Generator().manual_seed(job.seed))


def phi_sha256(flat: torch.Tensor) -> str:
    """sha256 of Φ's float32 bytes in the model's parameter order: equal iff bit-identical."""
    return hashlib.sha256(flat.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def checkpoint_state(job: JobConfig, store_state: dict[str, Any], path: str | None,
                     extra: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint: the store's state (Φ, optimizer, step, sampler), the resolved job, the
    executor path and the driver's ``extra`` (elapsed time, metrics window)."""
    return {**store_state, "config": job_to_dict(job), "path": path, **extra}


class LocalExecutor:
    """Runs the algorithm on this process's device, choosing the fastest path if asked."""

    def __init__(self, model: TaskModel, algorithm: Algorithm, sampler: TaskSampler, path: str = "auto",
                 precision: str = "fp32", device: torch.device | str = "cpu", compile: bool = False) -> None:
        """``compile`` runs the batched path with a compiled loss (``path`` auto then means batched)."""
        self.model, self.algorithm, self.sampler = model, algorithm, sampler
        self.precision, self.device = precision, torch.device(device)
        self.path = "batched" if compile else path
        self.compiled_loss = compiled(model.batched_loss) if compile else None

    def tasks(self, step: int, start: int, stop: int) -> TaskBatch:
        return to_device(self.sampler.sample("train", step, start, stop), self.device)

    def contribution(self, phi: Params, step: int, meta_batch: int) -> Contribution:
        return self.slice_contribution(phi, step, 0, meta_batch)

    def slice_contribution(self, phi: Params, step: int, start: int, stop: int) -> Contribution:
        """The contribution of tasks ``start..stop-1`` of meta-step ``step`` (what a worker computes)."""
        tasks = self.tasks(step, start, stop)
        if self.path == "auto":
            self.path = self.fastest_path(phi, tasks)
        with precision_context(self.precision, self.device):
            return compute_contribution(self.algorithm, self.model, phi, tasks, self.path, self.compiled_loss)

    def fastest_path(self, phi: Params, tasks: TaskBatch, repeats: int = 2) -> str:
        """Time each candidate path on real tasks (after a warm-up) and keep the fastest."""
        timings = {}
        for path in AUTO_CANDIDATES:
            with precision_context(self.precision, self.device):
                compute_contribution(self.algorithm, self.model, phi, tasks, path)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                start = time.perf_counter()
                for _ in range(repeats):
                    compute_contribution(self.algorithm, self.model, phi, tasks, path)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
            timings[path] = (time.perf_counter() - start) / repeats
        best = min(timings, key=timings.get)
        log.info("path auto: %s (%s)", best, ", ".join(f"{p} {t * 1000:.0f} ms/step" for p, t in timings.items()))
        return best


class LocalRuntime:
    """Every step computed and applied in this process (``runtime.workers: 0``)."""

    def __init__(self, job: JobConfig, run: Location, state: dict[str, Any] | None, device: torch.device) -> None:
        """``state``: the checkpoint to continue from, else start from the job's seed."""
        self.job, self.run = job, run
        model = build_model(job)
        phi = tree_to(initial_phi(job, model), device)
        if state is not None:
            state = {**state, "phi": tree_to(state["phi"], device), "opt_state": tree_to(state["opt_state"], device)}
        self.store = ParameterStore(phi, build_job_optimizer(job), job.train.meta_batch, state=state)
        self.executor = LocalExecutor(model, build_job_algorithm(job), build_sampler(job),
                                      (state or {}).get("path") or job.runtime.path, job.runtime.precision, device,
                                      job.runtime.compile)
        self.evaluator = JobEvaluator(job, device)

    @property
    def version(self) -> int:
        return self.store.version

    @property
    def path(self) -> str:
        return self.executor.path

    def advance(self) -> list[StepRecord]:
        """Raises:
            NonFiniteError: a non-finite meta-gradient (recomputing it would give the same).
        """
        step = self.store.version
        contribution = self.executor.contribution(self.store.phi(), step, self.job.train.meta_batch)
        part = self.store.layout.flatten_contribution(contribution)
        if self.store.submit(step, 0, part) == "rejected":
            bad = ", ".join(self.store.layout.non_finite_names(part.grad_sum)) or "the metrics"
            raise NonFiniteError(f"non-finite meta-gradient at step {step} in {bad}; Φ was not updated and "
                                 "checkpoints are intact. Lower optimizer.lr or algorithm.inner_lr.")
        return self.store.take_records()

    def finish(self) -> list[StepRecord]:
        return []

    def validate(self) -> Future:
        future: Future = Future()
        future.set_result(self.evaluator.validate(self.store.phi()))
        return future

    def test(self) -> dict[str, float]:
        return self.evaluator.test(self.store.phi())

    def checkpoint(self, extra: dict[str, Any]) -> None:
        state = tree_to(self.store.state_dict(), "cpu")
        save_checkpoint(self.run / "checkpoints", self.store.version, checkpoint_state(self.job, state, self.path, extra),
                        self.job.train.keep_checkpoints)

    def info(self) -> dict[str, Any]:
        return {"mode": "sync", "workers": 0, "device": str(self.executor.device), "phi_sha256": phi_sha256(self.store.flat),
                "restarts": {"workers": 0, "server": 0}, "rejected_contributions": self.store.rejected,
                "stale_contributions": 0}

    def close(self) -> None:
        pass
