"""Meta-training on Ray: a parameter-server actor, task-worker actors and an evaluator actor.

The thin distributed shell over the in-process pieces. The ``ParameterServer`` holds a
``ParameterStore`` (Φ as one flat buffer, the outer optimizer, the aggregation rules) and
publishes each new Φ once with ``ray.put``. ``TaskWorker``s hold a ``LocalExecutor``,
regenerate their tasks from the counter-based sampler (no task tensors cross the network),
and push their slice's summed gradient straight to the server. The ``Evaluator`` scores Φ
on meta-validation tasks beside training. The driver (``RayRuntime``) only hands out slices
and reads back what was applied.

Faults: a worker that dies is restarted by Ray and its call retried; a retried slice that
had already arrived is ignored, so Φ is as if nothing happened. A server that dies is
restarted and reloads the newest checkpoint; the driver rewinds to that step (counter-based
tasks make the recomputed steps identical). Non-finite slices are rejected and recomputed.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import time
from concurrent.futures import Future
from typing import Any

import numpy as np
import ray
import torch
from ray.util.client import ray as client_ray
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from distmeta.checkpoint import checkpoints, load_checkpoint, save_checkpoint
from distmeta.components import build_job_algorithm, build_job_optimizer, build_model, build_sampler
from distmeta.config import JobConfig, job_from_dict, job_to_dict
from distmeta.device import ALLOCATOR_ENV, resolve_device
from distmeta.evaluate import JobEvaluator
from distmeta.runtime import shared_slots
from distmeta.runtime.local import LocalExecutor, Rewound, checkpoint_state, initial_phi, phi_sha256
from distmeta.runtime.parameter_store import (
    WIRE_DTYPES,
    FlatContribution,
    FlatLayout,
    NonFiniteError,
    ParameterStore,
    StepRecord,
    from_wire,
    to_wire,
)
from distmeta.runtime.shared_slots import SlotRef, Slots, SlotSpec
from distmeta.storage import Location

log = logging.getLogger("distmeta.runtime")

FORWARDED_ENV = ("DISTMETA_OMNIGLOT", "DISTMETA_TRANSLATION", "DISTMETA_CACHE")
MAX_RESTARTS = 3  # an actor that keeps dying fails the run instead of retrying forever
MAX_NON_FINITE_RETRIES = 2  # recomputations of a step whose slices came back non-finite
PLACEMENT_TIMEOUT_S = 60.0
ASYNC_POLL_S = 0.05


def task_slices(meta_batch: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous, nearly equal slices of ``0..meta_batch-1`` in task order (none empty)."""
    workers = min(workers, meta_batch)
    bounds = [round(i * meta_batch / workers) for i in range(workers + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class RecentObjects:
    """``ray.put`` that keeps the last few objects alive. Freeing each big object just before
    the next put of the same size makes that put fault its memory in afresh: a 40 MB put
    (Φ or a slice of a 10M-parameter model) takes 21 ms that way, 5 ms with the last few kept."""

    def __init__(self, keep: int = 3) -> None:
        self.refs: collections.deque[ray.ObjectRef] = collections.deque(maxlen=keep)

    def put(self, value: Any) -> ray.ObjectRef:
        self.refs.append(ray.put(value))
        return self.refs[-1]


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
class ParameterServer:
    """Owns Φ, the optimizer state and the checkpoints; applies pushed slices by the job's mode."""

    def __init__(self, job_dict: dict[str, Any], run_uri: str, slices: int, slots: SlotSpec | None = None) -> None:
        """``slots``: the shared buffers of a sync run whose workers are all on this node (Φ is
        then written there instead of put in the object store, and slices arrive there)."""
        job = self.job = job_from_dict(job_dict, "server job")
        torch.set_num_threads(job.runtime.server_threads)
        self.checkpoints = Location(run_uri) / "checkpoints"
        found = checkpoints(self.checkpoints)
        state = load_checkpoint(found[-1]) if found else None
        self.store = ParameterStore(initial_phi(job, build_model(job)), build_job_optimizer(job), job.train.meta_batch,
                                    slices, job.runtime.mode, job.runtime.staleness, state)
        self.stopped = False
        self.slots = Slots(slots, server=True) if slots else None
        self.published = RecentObjects()
        self.last_step_s = {"apply": 0.0, "publish": 0.0}  # the server's own cost of the last step
        self._publish()

    def _publish(self) -> None:
        if self.slots:
            shared = from_wire(self.slots.phi)
            if self.store.flat.data_ptr() != shared.data_ptr():  # once: the apply then updates Φ in place there
                self.store.keep_phi_in(shared)
            self.phi_ref = None
        else:
            self.phi_ref = self.published.put(to_wire(self.store.flat))  # one copy, read by every worker

    def pull(self) -> tuple[int, list[ray.ObjectRef]]:
        """The current version and Φ (the reference wrapped in a list, so it is not fetched here)."""
        return self.store.version, [self.phi_ref]

    def push(self, version: int, index: int, part: FlatContribution | SlotRef) -> str:
        if self.stopped or self.store.version >= self.job.train.steps:
            return "stale"
        if isinstance(part, SlotRef):  # its buffer is read in place until the step is applied
            part = FlatContribution(from_wire(self.slots.slices[index], WIRE_DTYPES[self.slots.contributions]),
                                    part.num_tasks, part.metrics)
        start = time.perf_counter()
        status = self.store.submit(version, index, part)
        if status == "applied":
            applied = time.perf_counter()
            self._publish()
            self.last_step_s = {"apply": applied - start, "publish": time.perf_counter() - applied}
        return status

    def ticket(self) -> tuple[int, list[ray.ObjectRef], int, int] | None:
        """Async mode: (version, Φ, step, slice index) of the next slice to compute; None when done."""
        if self.stopped or self.store.version >= self.job.train.steps:
            return None
        step, index = self.store.ticket()
        return self.store.version, [self.phi_ref], step, index

    def status(self, drain: bool = True) -> dict[str, Any]:
        """Version, Φ, the steps applied since the last drain and the counters, in one round trip."""
        return {"version": self.store.version, "phi": [self.phi_ref],
                "records": self.store.take_records() if drain else [],
                "pid": os.getpid(), "rejected": self.store.rejected, "stale": self.store.stale,
                "last_step_s": self.last_step_s}

    def stop(self) -> None:
        self.stopped = True

    def checkpoint(self, path: str | None, extra: dict[str, Any], driver_step: int) -> int:
        """Save unless this server is behind the driver (it restarted since: ``extra`` would
        not match its state); returns its version either way."""
        if self.store.version >= driver_step:
            state = checkpoint_state(self.job, self.store.state_dict(), path, extra)
            save_checkpoint(self.checkpoints, self.store.version, state, self.job.train.keep_checkpoints)
        return self.store.version

    def flat(self) -> np.ndarray:
        return to_wire(self.store.flat)


class SliceChannel:
    """How a worker reads Φ and sends its slices: through the run's shared buffers where it
    has them (``shared_slots``), else through the object store."""

    def __init__(self, slots: SlotSpec | None) -> None:
        self.slots = Slots(slots, server=False) if slots else None
        self.sent = RecentObjects()

    def phi(self, phi_ref: ray.ObjectRef | None) -> np.ndarray:
        """Φ on the wire (a read-only view): as the server last wrote it, or ``phi_ref``'s."""
        return self.slots.phi if self.slots else ray.get(phi_ref)

    def push(self, server: Any, version: int, index: int, part: FlatContribution) -> str:
        """Send slice ``index`` of step ``version``; returns the server's verdict."""
        if self.slots:
            np.copyto(self.slots.slices[index], to_wire(part.grad_sum))
            return ray.get(server.push.remote(version, index, SlotRef(part.num_tasks, part.metrics)))
        return ray.get(server.push.remote(version, index, self.sent.put(part)))


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
class TaskWorker:
    """Builds the job's pieces once, then computes slices at the Φ versions it is handed."""

    def __init__(self, job_dict: dict[str, Any], threads: int, path: str, layout: FlatLayout,
                 slots: SlotSpec | None = None) -> None:
        torch.set_num_threads(threads)
        job = job_from_dict(job_dict, "worker job")
        self.device = resolve_device("cuda" if job.runtime.worker_gpus > 0 else "cpu")  # what Ray reserved for it
        self.executor = LocalExecutor(build_model(job), build_job_algorithm(job), build_sampler(job), path,
                                      job.runtime.precision, self.device, job.runtime.compile)
        self.layout, self.cached, self.channel = layout, ("", None), SliceChannel(slots)
        self.wire_dtype = WIRE_DTYPES[job.runtime.contributions]

    def _phi(self, phi_ref: ray.ObjectRef | None) -> dict[str, torch.Tensor]:
        """Φ, fetched once per published buffer (versions repeat after a server restart; refs do
        not); with shared buffers, Φ as the server last wrote it (None: no ref)."""
        key = None if self.channel.slots else phi_ref.hex()  # a shared Φ is rewritten in place: never cached
        if key is None or self.cached[0] != key:
            self.cached = (key or "", self.layout.unflatten(from_wire(self.channel.phi(phi_ref)).to(self.device)))
        return self.cached[1]

    def _compute(self, phi_ref: ray.ObjectRef, step: int, start: int, stop: int) -> FlatContribution:
        contribution = self.executor.slice_contribution(self._phi(phi_ref), step, start, stop)
        part = self.layout.flatten_contribution(contribution)  # moved to the CPU when it is pickled
        return part._replace(grad_sum=part.grad_sum.to(self.wire_dtype))

    def compute(self, server: Any, path: str, version: int, phi: list[ray.ObjectRef], index: int, start: int,
                stop: int) -> tuple[str, int]:
        """Sync mode: slice ``index`` (tasks ``start..stop-1``) of step ``version`` on ``path``
        (given each time: a restarted worker must not choose again), pushed to the server;
        returns the server's verdict and this process's id (a new one after a restart)."""
        self.executor.path = path
        part = self._compute(phi[0], version, start, stop)
        return self.channel.push(server, version, index, part), os.getpid()

    def run_async(self, server: Any, path: str, slices: list[tuple[int, int]]) -> int:
        """Async mode: compute and push tickets until the server has no more; returns how many.
        A ticket whose Φ died with a restarted server is skipped (async steps are not replayed)."""
        self.executor.path, done = path, 0
        while (ticket := ray.get(server.ticket.remote())) is not None:
            version, phi, step, index = ticket
            start, stop = slices[index]
            try:
                part = self._compute(phi[0], step, start, stop)
            except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError):
                continue
            self.channel.push(server, version, index, part)
            done += 1
        return done

    def choose_path(self, phi: list[ray.ObjectRef], start: int, stop: int) -> str:
        """Time the candidate paths on tasks ``start..stop-1`` of step 0; returns the fastest."""
        return self.executor.fastest_path(self._phi(phi[0]), self.executor.tasks(0, start, stop))

    def identity(self) -> tuple[str, int]:
        """(Ray node id, process id): where this worker runs now."""
        return ray.get_runtime_context().get_node_id(), os.getpid()


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
class Evaluator:
    """Scores Φ on meta-validation / meta-test tasks beside training."""

    def __init__(self, job_dict: dict[str, Any], threads: int, layout: FlatLayout) -> None:
        torch.set_num_threads(threads)
        job = job_from_dict(job_dict, "evaluator job")
        self.evaluator = JobEvaluator(job, resolve_device("cuda" if job.runtime.evaluator_gpus > 0 else "cpu"))
        self.layout = layout

    def validate(self, phi: list[ray.ObjectRef]) -> dict[str, float]:
        return self.evaluator.validate(self.layout.unflatten(from_wire(ray.get(phi[0]))))

    def test(self, phi: list[ray.ObjectRef]) -> dict[str, float]:
        return self.evaluator.test(self.layout.unflatten(from_wire(ray.get(phi[0]))))


class RayRuntime:
    """Drives a run on Ray: slices out to the workers, steps applied by the server."""

    def __init__(self, job: JobConfig, run: Location, state: dict[str, Any] | None) -> None:
        """``state``: the checkpoint the server will continue from (read here only for its path).

        Raises:
            ValueError: the cluster cannot hold the workers (too few CPUs/GPUs, or the
                placement strategy cannot be satisfied within a minute).
        """
        rt = job.runtime
        self.job, self.mode = job, rt.mode
        job_dict = job_to_dict(job)
        self.path = (state or {}).get("path") or rt.path  # "auto" is resolved once below, for all workers
        self.slices = task_slices(job.train.meta_batch, rt.workers)
        layout = FlatLayout.of(initial_phi(job, build_model(job)))
        options = {"runtime_env": {"env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
                                   | ALLOCATOR_ENV}}
        self.group, bundles = reserve_workers(len(self.slices), rt.worker_cpus, rt.worker_gpus, rt.placement,
                                              (rt.evaluator_cpus, rt.evaluator_gpus), rt.scale_up_timeout_s)
        self.owns_group = self.group != get_current_placement_group()
        self.workers, self.server, self.evaluator = [], None, None
        self.loops: list[ray.ObjectRef] = []
        self.in_flight: list[ray.ObjectRef] = []  # sync: the step's slice calls, until they returned
        self.slots: SlotSpec | None = None
        try:
            self.slots = self._shared_slots(bundles, sum(layout.sizes))
            threads = max(1, int(rt.worker_cpus))
            self.workers = [TaskWorker.options(num_cpus=rt.worker_cpus, num_gpus=rt.worker_gpus, **options,
                                               scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, bundle))
                            .remote(job_dict, threads, self.path, layout, self.slots) for bundle in bundles]
            # The server writes the checkpoints: keep it on the driver's node, which reaches the
            # storage (and holds the shared buffers, if any).
            beside_driver = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                           soft=self.slots is None)
            self.server = ParameterServer.options(num_cpus=0, scheduling_strategy=beside_driver, **options).remote(
                job_dict, run.uri, len(self.slices), self.slots)
            self.evaluator = Evaluator.options(num_cpus=rt.evaluator_cpus, num_gpus=rt.evaluator_gpus, **options).remote(
                job_dict, max(1, int(rt.evaluator_cpus)), layout)
            identities = ray.get([w.identity.remote() for w in self.workers])
            self.worker_nodes = [node for node, _ in identities]
            self.worker_pids = [pid for _, pid in identities]
            status = self.last = ray.get(self.server.status.remote())
            self.version, self.server_pid = status["version"], status["pid"]
            if self.path == "auto":  # every worker must run the same arithmetic: worker 0 picks
                self.path = ray.get(self.workers[0].choose_path.remote(status["phi"], *self.slices[0]))
            self.rejected, self.stale, self.restarts = status["rejected"], status["stale"], {"workers": 0, "server": 0}
        except BaseException:  # leave nothing behind: actors, reservation
            self.close()
            raise
        log.info("ray: %d task workers (%s placement, %s) on nodes %s, parameter server at step %d%s",
                 len(self.workers), rt.placement, self.mode, sorted(set(self.worker_nodes)), self.version,
                 ", slices and Φ in shared memory" if self.slots else "")

    def _shared_slots(self, bundles: list[int], size: int) -> SlotSpec | None:
        """Shared buffers (see ``shared_slots``) for a sync run whose workers are all on the
        driver's node, where the server goes; None otherwise: the object store carries it all."""
        rt = self.job.runtime
        if self.mode != "sync" or client_ray.is_connected() or not shared_slots.available():
            return None  # (a ray:// client is not on the node it names as its own)
        nodes = placement_group_table(self.group)["bundles_to_node_id"]
        here = ray.get_runtime_context().get_node_id()
        if any(nodes[b] != here for b in bundles):
            return None
        try:
            return shared_slots.create(len(self.slices), size, rt.contributions)
        except OSError as error:  # e.g. a container's small /dev/shm
            log.warning("ray: no shared buffers in %s (%s); slices and Φ go through the object store",
                        shared_slots.ROOT, error)
            return None

    def advance(self) -> list[StepRecord]:
        """Raises:
            Rewound: the server restarted from an earlier checkpoint.
            NonFiniteError: a step's slices stayed non-finite after retries.
        """
        return self._sync_step() if self.mode == "sync" else self._async_wait()

    def _sync_step(self) -> list[StepRecord]:
        non_finite = 0
        while True:
            version, phi = self.last["version"], self.last["phi"]  # as of the end of the last step
            self._check_server(version)
            calls = [w.compute.remote(self.server, self.path, version, phi, i, a, b)
                     for i, (w, (a, b)) in enumerate(zip(self.workers, self.slices))]
            server_pid, self.in_flight = self.server_pid, calls
            try:
                outcome = ray.get(calls)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError):
                if self._status(drain=False)["pid"] == server_pid:
                    raise  # not the server: a worker that stays dead (restarts used up) fails the run
                outcome = []  # the server died under the workers: see below what it restarted from
            self._count_worker_restarts([pid for _, pid in outcome])
            status = self._status()
            self.in_flight = []  # only once its records are taken: finish() would wait and drain them
            if status["version"] == version + 1:
                return status["records"]
            self._check_server(status["version"])
            if any(result == "rejected" for result, _ in outcome):
                non_finite += 1
                if non_finite > MAX_NON_FINITE_RETRIES:
                    raise NonFiniteError(f"step {version}: contributions stayed non-finite after "
                                         f"{MAX_NON_FINITE_RETRIES} recomputations; Φ was not updated and "
                                         "checkpoints are intact. Lower optimizer.lr or algorithm.inner_lr.")
                log.warning("step %d: non-finite contribution(s) rejected (%d so far); recomputing the step",
                            version, self.rejected)

    def _async_wait(self) -> list[StepRecord]:
        if not self.loops:
            self.loops = [w.run_async.remote(self.server, self.path, self.slices) for w in self.workers]
        rejected_before = self.rejected
        while True:
            finished, _ = ray.wait(self.loops, num_returns=len(self.loops), timeout=0)
            ray.get(finished)  # a worker loop that failed raises here
            status = self._status()
            self._check_server(status["version"])
            self.version = status["version"]
            if status["records"]:
                return status["records"]
            if self.rejected - rejected_before > MAX_NON_FINITE_RETRIES * len(self.slices):
                raise NonFiniteError(f"step {self.version}: {self.rejected - rejected_before} non-finite "
                                     "contributions rejected in a row; Φ was not updated. Lower optimizer.lr "
                                     "or algorithm.inner_lr.")
            if len(finished) == len(self.loops):
                return []
            time.sleep(ASYNC_POLL_S)

    def finish(self) -> list[StepRecord]:
        if self.in_flight:  # sync, interrupted (Ctrl-C) while a step was computed: let it land
            ray.wait(self.in_flight, num_returns=len(self.in_flight))
            self.in_flight = []
            return self._status()["records"]
        if not self.loops:
            return []
        ray.get(self.server.stop.remote())
        ray.get(self.loops)  # they end at their next ticket
        self.loops = []
        return self._status()["records"]

    def _status(self, drain: bool = True) -> dict[str, Any]:
        """The server's status; counts a restart when its process changed. ``drain=False``
        leaves the applied steps' records for the next draining call."""
        status = ray.get(self.server.status.remote(drain))
        if drain:
            self.last = status
        self.rejected, self.stale = status["rejected"], status["stale"]
        if status["pid"] != self.server_pid:
            log.warning("parameter server was restarted (pid %d → %d)", self.server_pid, status["pid"])
            self.server_pid = status["pid"]
            self.restarts["server"] += 1
        if status["version"] >= self.version:
            self.version = status["version"]
        return status

    def _count_worker_restarts(self, pids: list[int]) -> None:
        for i, pid in enumerate(pids):
            if pid != self.worker_pids[i]:
                self.restarts["workers"] += 1
                log.warning("task worker %d was restarted (pid %d → %d); its slice was recomputed",
                            i, self.worker_pids[i], pid)
                self.worker_pids[i] = pid

    def _check_server(self, version: int) -> None:
        """Raise ``Rewound`` when the server came back at an earlier step than the driver's."""
        if version < self.version:
            self._status(drain=False)  # counts the restart
            lost, self.version = self.version - version, version
            log.warning("parameter server restarted from its checkpoint at step %d: %d step(s) of work lost, "
                        "recomputing them", version, lost)
            raise Rewound(version, lost)

    def validate(self) -> Future:
        # Φ as the output of a driver call, so the driver owns it: a queued validation
        # survives a server restart.
        return self.evaluator.validate.remote([self.server.flat.remote()]).future()

    def test(self) -> dict[str, float]:
        return ray.get(self.evaluator.test.remote([self.server.flat.remote()]))

    def checkpoint(self, extra: dict[str, Any]) -> None:
        if ray.get(self.server.checkpoint.remote(self.path, extra, self.version)) < self.version:
            self._status()  # Φ as the restarted server holds it, for the steps to redo
            self._check_server(self.last["version"])

    def info(self) -> dict[str, Any]:
        self._status()
        self._count_worker_restarts([pid for _, pid in ray.get([w.identity.remote() for w in self.workers])])
        return {"mode": self.mode, "workers": len(self.workers),
                "device": "cuda" if self.job.runtime.worker_gpus > 0 else "cpu", "placement": self.job.runtime.placement,
                "worker_nodes": self.worker_nodes, "transport": "shared memory" if self.slots else "object store",
                "phi_sha256": phi_sha256(from_wire(ray.get(self.server.flat.remote()))),
                "restarts": dict(self.restarts), "rejected_contributions": self.rejected,
                "stale_contributions": self.stale}

    def close(self) -> None:
        if self.loops:  # a run that failed mid-way: let the async loops end before their actors go
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(self.server.stop.remote())
                ray.wait(self.loops, num_returns=len(self.loops), timeout=30)
        try:
            for actor in (*self.workers, self.server, self.evaluator):
                if actor is not None:
                    ray.kill(actor, no_restart=True)
        finally:
            if self.slots:
                shared_slots.remove(self.slots)
            if self.owns_group:
                remove_placement_group(self.group)


def reserve_workers(workers: int, cpus: float, gpus: float, strategy: str,
                    beside: tuple[float, float] = (0.0, 0.0),
                    scale_up_timeout_s: float = 0.0) -> tuple[PlacementGroup, list[int]]:
    """A placement group with one bundle per worker, ready, so all workers start together,
    and the workers' bundle indices. Inside a Ray Tune trial, whose placement group already
    reserves the workers (its last bundles), that group. ``beside`` (CPUs, GPUs) is what
    else the run needs at the same time (the evaluator), counted in the feasibility check.

    With ``scale_up_timeout_s`` the cluster may lack the resources now: the pending group is
    the demand a Ray autoscaler adds nodes for (an autoscaling GPU node type that starts at
    zero, as in cluster.yaml), and the group is awaited that long instead of failing fast.

    Raises:
        ValueError: the cluster (or every node) has too few CPUs/GPUs and no scale-up wait was
            asked for, or the group cannot be placed within the wait (at least
            ``PLACEMENT_TIMEOUT_S``; Ray would wait forever).
    """
    current = get_current_placement_group()
    if current is not None:
        count = len(current.bundle_specs)
        if count < workers:
            raise ValueError(f"this placement group has {count} bundles, fewer than the {workers} workers")
        return current, list(range(count - workers, count))
    total = ray.cluster_resources()
    largest = {r: max((n["Resources"].get(r, 0.0) for n in ray.nodes() if n["Alive"]), default=0.0)
               for r in ("CPU", "GPU")}
    short: list[tuple[str, str]] = []  # (what the cluster lacks now, what to lower)
    for resource, each, other in (("CPU", cpus, beside[0]), ("GPU", gpus, beside[1])):
        key = f"runtime.worker_{resource.lower()}s"
        if workers * each + other > total.get(resource, 0.0):
            evaluator = f" + {other:g} for the evaluator" if other else ""
            short.append((f"{workers} workers × {each:g} {resource}{evaluator} = {workers * each + other:g} "
                          f"{resource}, but the Ray cluster has {total.get(resource, 0.0):g}",
                          f"lower runtime.workers, {key} or runtime.evaluator_{resource.lower()}s"))
        elif each > largest[resource]:
            short.append((f"one worker asks for {each:g} {resource} but the largest node has {largest[resource]:g}",
                          f"lower {key}"))
    if short and not scale_up_timeout_s:
        fact, advice = short[0]
        raise ValueError(f"{fact}; {advice} (or, on an autoscaling cluster, set runtime.scale_up_timeout_s)")
    bundle = {"CPU": cpus} | ({"GPU": gpus} if gpus else {})
    group = placement_group([dict(bundle) for _ in range(workers)], strategy=strategy)
    timeout = max(PLACEMENT_TIMEOUT_S, scale_up_timeout_s)
    if short:
        log.info("ray: the cluster is short now (%s); waiting up to %g s for it to scale up", short[0][0], timeout)
    ready, _ = ray.wait([group.ready()], timeout=timeout)
    if not ready:
        remove_placement_group(group)
        nodes = sum(1 for n in ray.nodes() if n["Alive"])
        raise ValueError(f"cannot place {workers} workers of {bundle} with {strategy} on this cluster ({nodes} live "
                         f"nodes) within {timeout:g} s; use another runtime.placement or fewer workers"
                         + (", or wait longer (runtime.scale_up_timeout_s)" if scale_up_timeout_s else ""))
    return group, list(range(workers))


class RaySession:
    """Connects to ``address`` (else ``$RAY_ADDRESS``), or starts a new embedded local Ray,
    unless this process is already connected; on exit shuts down only what it started.

    Raises (on enter):
        ValueError: an address was given but this process is already connected elsewhere,
            or nothing answers at a ``host:port`` address.
    """

    def __init__(self, address: str | None, log_to_driver: bool = False, dashboard: bool | None = False) -> None:
        """``log_to_driver``: show the actors' and tasks' output here (progress of Ray Train
        workers); ``dashboard``: start the dashboard, whose state API Ray Train polls (None:
        where its packages are installed)."""
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.started, self.log_to_driver, self.dashboard = False, log_to_driver, dashboard

    def __enter__(self) -> "RaySession":
        if self.address:
            check_reachable(self.address)
        if ray.is_initialized():
            if self.address:
                raise ValueError(f"Ray is already initialised in this process; cannot also join {self.address}")
            return self
        ray.init(address=self.address or "local", include_dashboard=self.dashboard, log_to_driver=self.log_to_driver)
        self.started = True
        log.info("ray: %s", f"connected to {self.address}" if self.address else "new embedded local instance")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.started:
            ray.shutdown()


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a ``host:port`` cluster address where nothing listens, or where what
    listens does not speak gRPC as Ray's GCS does (``ray.init`` would keep retrying for a long
    time). Other forms (``auto``, ``ray://``) are left to Ray, and so is the gRPC check of a
    TLS cluster (``RAY_USE_TLS``), whose handshake a plain channel cannot make."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return
    advice = "check runtime.address / --address / $RAY_ADDRESS"
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise ValueError(f"no Ray cluster answers at {address} ({error}); {advice}") from None
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return
    import grpc  # Ray's own dependency

    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise ValueError(f"something listens at {address} but it is not a Ray cluster (no gRPC answer in "
                             f"{timeout_s:g} s); {advice}") from None
