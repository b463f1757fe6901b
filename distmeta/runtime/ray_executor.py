"""Task-worker actors on Ray: each computes the contribution of its slice of the meta-batch.

The thin distributed shell over the same step functions: a worker holds a LocalExecutor
(model, algorithm, counter-based sampler) and regenerates its own tasks from the counters,
so only Φ (one ``ray.put`` per step) and the summed slice gradients cross the network.
The driver adds the slices' contributions in task order. A worker that dies is restarted
by Ray and its call retried, so the step's result does not change.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import ray
import torch

from distmeta.algorithms.paths import sum_contributions
from distmeta.types import Contribution, Params

log = logging.getLogger("distmeta.runtime")

FORWARDED_ENV = ("DISTMETA_OMNIGLOT", "DISTMETA_CACHE")
MAX_RESTARTS = 3  # a worker that keeps dying fails the run instead of retrying forever


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
class TaskWorker:
    """Builds the job's pieces once, then serves slice contributions at a given Φ."""

    def __init__(self, job_dict: dict[str, Any], threads: int, path: str) -> None:
        from distmeta.components import build_job_algorithm, build_model, build_sampler
        from distmeta.config import job_from_dict
        from distmeta.device import resolve_device
        from distmeta.runtime.local import LocalExecutor

        torch.set_num_threads(threads)
        job = job_from_dict(job_dict, "worker job")
        device = resolve_device("cuda" if job.runtime.worker_gpus > 0 else "cpu")  # what Ray reserved for it
        self.executor = LocalExecutor(build_model(job), build_job_algorithm(job), build_sampler(job), path,
                                      job.runtime.precision, device, job.runtime.compile)

    def contribution(self, phi: Params, step: int, start: int, stop: int) -> Contribution:
        result = self.executor.slice_contribution(phi, step, start, stop)
        return Contribution({n: g.cpu() for n, g in result.grad_sum.items()}, result.num_tasks,
                            {k: v.cpu() for k, v in result.metrics.items()})

    def pid(self) -> int:
        return os.getpid()


def task_slices(meta_batch: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous, nearly equal slices of ``0..meta_batch-1`` in task order (none empty)."""
    workers = min(workers, meta_batch)
    bounds = [round(i * meta_batch / workers) for i in range(workers + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class RayExecutor:
    """Splits each meta-batch over ``workers`` TaskWorker actors and sums their slices in order.

    ``path`` (``auto`` means ``batched`` here, so every worker runs the same arithmetic) may
    come from a checkpoint, so a resumed run keeps the path it started with.
    """

    def __init__(self, job_dict: dict[str, Any], workers: int, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, path: str | None = None) -> None:
        """Raises:
            ValueError: the cluster, or every single node of it, has fewer CPUs or GPUs than
                the workers ask for (Ray would otherwise leave them pending forever).
        """
        total = ray.cluster_resources()
        largest = {r: max((n["Resources"].get(r, 0.0) for n in ray.nodes() if n["Alive"]), default=0.0)
                   for r in ("CPU", "GPU")}
        for resource, each in (("CPU", cpus_per_worker), ("GPU", gpus_per_worker)):
            key = f"runtime.worker_{resource.lower()}s"
            if workers * each > total.get(resource, 0.0):
                raise ValueError(f"{workers} workers × {each:g} {resource} = {workers * each:g} {resource}, but the "
                                 f"Ray cluster has {total.get(resource, 0.0):g}; lower runtime.workers or {key}")
            if each > largest[resource]:
                raise ValueError(f"one worker asks for {each:g} {resource} but the largest node has "
                                 f"{largest[resource]:g}; lower {key}")
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        options = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker, "runtime_env": {"env_vars": env}}
        threads = max(1, int(cpus_per_worker))
        path = path or job_dict["runtime"]["path"]
        self.path = "batched" if path == "auto" else path
        self.workers = [TaskWorker.options(**options).remote(job_dict, threads, self.path) for _ in range(workers)]

    def contribution(self, phi: Params, step: int, meta_batch: int) -> Contribution:
        phi_ref = ray.put({n: p.detach().cpu() for n, p in phi.items()})
        slices = task_slices(meta_batch, len(self.workers))
        refs = [w.contribution.remote(phi_ref, step, a, b) for w, (a, b) in zip(self.workers, slices)]
        parts = ray.get(refs)
        total = sum_contributions(parts)
        device = next(iter(phi.values())).device
        return Contribution({n: g.to(device) for n, g in total.grad_sum.items()}, total.num_tasks, total.metrics)

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)


class RaySession:
    """Connects to ``address`` (else ``$RAY_ADDRESS``), or starts a new embedded local Ray,
    unless this process is already connected; on exit shuts down only what it started.

    Raises (on enter):
        ValueError: an address was given but this process is already connected elsewhere.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.started = False

    def __enter__(self) -> "RaySession":
        if ray.is_initialized():
            if self.address:
                raise ValueError(f"Ray is already initialised in this process; cannot also join {self.address}")
            return self
        ray.init(address=self.address or "local", include_dashboard=False, log_to_driver=False)
        self.started = True
        log.info("ray: %s", f"connected to {self.address}" if self.address else "new embedded local instance")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.started:
            ray.shutdown()
