"""Ray parameter-server runtime: overhead, scaling, parameter-server cost, sync vs async.

All cases run on one embedded local Ray started here (all the machine's CPUs) and shut
down at the end, in a process restarted once with the ``distmeta`` command's allocator
settings (``distmeta.device.ALLOCATOR_ENV``, which the actors get too). The Omniglot job is jobs/omniglot_5w1s.yaml (5-way 1-shot, second-order
MAML, conv4, meta-batch 32, Q = 15) on the per-task loop path, 1 torch thread per process.

1. Ray overhead: the job in-process (``LocalRuntime``) vs on 1 task worker of 1 CPU.
2. Scaling: the same on 2 task workers of 1 CPU each; as a control without Ray, 2 plain
   processes computing the two 16-task slices of each step side by side (no Φ exchange).
   Throughput of cases 1-2 is tasks/s of ``advance()`` alone: runtimes are built, their actors
   ready and one warm-up step done before the clock starts. Each of the three is timed in
   single steps alternating with single in-process steps (``--pairs`` pairs), so the machine's
   drift hits both sides of a ratio alike; 2 workers / 1 worker is the ratio of their speed-ups.
3. Parameter-server cost: ms per sync step of the real ``ParameterServer`` actor (sinusoid
   MLP job sized to 0.1M-50M parameters) with 1, 2, 4 fake workers that fetch Φ and push a
   precomputed slice (no task compute), from the fan-out to the server's status showing the
   next version; the server's own timing of its apply (``ParameterStore.submit``) and publish
   (Φ written for the workers) gives the split. Once back to back, once with the fake workers
   waiting ``--gap-ms`` in place of the compute (not counted), since real steps are spaced by
   compute; each through the shared buffers a one-node sync run uses and through the object store.
4. sync vs async (staleness 2) on 2 workers for the same wall-clock budget: tasks/s and
   meta-test accuracy (one seed).
5-6. (device machine) 1/4/8 CPU workers; one GPU as 1 × 1, 2 × 0.5 or 4 × 0.25 GPU workers.
7. Translation: target tokens/s of first-order MAML (jobs/translation_meta.yaml) in-process
   and on 1 and 2 workers.

    DISTMETA_OMNIGLOT=../shared/data/omniglot python bench/ray_runtime.py [--quick] [--json bench/results/ray_runtime.json]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import ray
import torch

from distmeta.components import build_job_algorithm, build_model, build_sampler
from distmeta.config import JobConfig, job_to_dict, load_job
from distmeta.device import ALLOCATOR_ENV, restart_with_allocator_env
from distmeta.runtime import shared_slots
from distmeta.runtime.local import LocalExecutor, LocalRuntime, initial_phi
from distmeta.runtime.parameter_store import WIRE_DTYPES, FlatContribution, FlatLayout
from distmeta.runtime.ray_runtime import ParameterServer, RayRuntime, SliceChannel, task_slices
from distmeta.runtime.shared_slots import SlotSpec
from distmeta.storage import Location

ROOT = Path(__file__).resolve().parent.parent
OMNIGLOT_JOB = ROOT / "jobs" / "omniglot_5w1s.yaml"
SINUSOID_JOB = ROOT / "jobs" / "sinusoid_smoke.yaml"
# The same arithmetic in and out of Ray: ``path: auto`` picks the loop in-process on this CPU but
# means ``batched`` on Ray workers, which would measure the path instead of the runtime.
OMNIGLOT_SETTINGS = ["runtime.path=loop", "runtime.threads=1", "runtime.worker_cpus=1", "train.steps=1000000",
                     "train.val_every=0"]
PS_SIZES = {"0.1M": 100_000, "1M": 1_000_000, "10M": 10_000_000, "50M": 50_000_000}
PS_STEPS = {"0.1M": 30, "1M": 20, "10M": 10, "50M": 5}  # timed steps per (size, workers), after 2 warm-up steps
PS_TARGET_MS = {"10M": 50.0}  # per sync step, at every worker count
TARGETS = {"1 worker / in-process": 0.9, "2 workers / 1 worker": 1.7}  # throughput ratios


def omniglot_job(workers: int, extra: tuple[str, ...] = ()) -> JobConfig:
    """The Omniglot job with the settings above on ``workers`` Ray workers (0: in-process)."""
    return load_job(OMNIGLOT_JOB, [*OMNIGLOT_SETTINGS, f"runtime.workers={workers}", *extra])


@contextlib.contextmanager
def ray_runtime(job: JobConfig) -> Iterator[RayRuntime]:
    """A ``RayRuntime`` whose actors (evaluator included) have finished starting; closed on exit."""
    with tempfile.TemporaryDirectory() as out:
        runtime = RayRuntime(job, Location(out), None)
        try:
            ray.get(runtime.evaluator.__ray_ready__.remote())  # its data loading must not overlap the timing
            yield runtime
        finally:
            runtime.close()


def timed_steps(runtime: LocalRuntime | RayRuntime, steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls to ``advance()``."""
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        runtime.advance()
        seconds.append(time.perf_counter() - start)
    return seconds


@functools.cache
def slice_executor() -> tuple[LocalExecutor, dict[str, torch.Tensor]]:
    """This process's executor of the Omniglot job and Φ at step 0 (built on first use)."""
    torch.set_num_threads(1)
    job = omniglot_job(0)
    model = build_model(job)
    return LocalExecutor(model, build_job_algorithm(job), build_sampler(job), job.runtime.path), initial_phi(job, model)


def slice_seconds(start: int, stop: int, steps: int) -> float:
    """Seconds to compute tasks ``start..stop-1`` of ``steps`` meta-steps (Φ fixed)."""
    executor, phi = slice_executor()
    begin = time.perf_counter()
    for step in range(steps):
        executor.slice_contribution(phi, step, start, stop)
    return time.perf_counter() - begin


def two_processes(pools: list[ProcessPoolExecutor], slices: list[tuple[int, int]], steps: int) -> float:
    """Seconds of the slower of two processes computing one slice each, side by side."""
    futures = [pool.submit(slice_seconds, start, stop, steps) for pool, (start, stop) in zip(pools, slices)]
    return max(future.result() for future in futures)


def paired(local: LocalRuntime, other: Callable[[], float], pairs: int) -> dict[str, Any]:
    """Alternating single steps, in-process then ``other``: seconds of each, and the median of
    the per-pair speed-ups (in-process seconds / other seconds)."""
    local_s, other_s = [], []
    for _ in range(pairs):
        local_s += timed_steps(local, 1)
        other_s.append(other())
    return {"in_process_s": local_s, "other_s": other_s,
            "speedup": statistics.median(a / b for a, b in zip(local_s, other_s))}


def throughput_cases(pairs: int) -> dict[str, Any]:
    """Cases 1 and 2: each of 2 plain processes (no Ray), 1 and 2 Ray workers against the
    in-process runtime, alternating single steps so that the machine's drift hits both alike."""
    jobs = {"in-process": omniglot_job(0), "1 worker": omniglot_job(1), "2 workers": omniglot_job(2)}
    meta_batch = jobs["in-process"].train.meta_batch
    halves = task_slices(meta_batch, 2)
    found: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as out, contextlib.ExitStack() as stack:
        pools = [stack.enter_context(ProcessPoolExecutor(1, get_context("spawn"))) for _ in halves]
        local = LocalRuntime(jobs["in-process"], Location(out), None, torch.device("cpu"))
        local.advance()  # warm-up
        two_processes(pools, halves, 1)  # builds and warms both processes
        found["2 processes, no Ray"] = paired(local, lambda: two_processes(pools, halves, 1), pairs)
        for name in ("1 worker", "2 workers"):
            with ray_runtime(jobs[name]) as runtime:
                runtime.advance()  # warm-up: first fetch of Φ, allocator, oneDNN
                found[name] = paired(local, lambda: timed_steps(runtime, 1)[0], pairs)
    for name, f in found.items():
        f["tasks_per_s"] = meta_batch / statistics.median(f["other_s"])
        print(f"  {name}: {f['tasks_per_s']:.1f} tasks/s, {f['speedup']:.2f}× in-process", flush=True)
    local_s = [t for f in found.values() for t in f["in_process_s"]]
    return {"meta_batch": meta_batch, "pairs": pairs, "in_process_tasks_per_s": meta_batch / statistics.median(local_s),
            "runs": found,
            "ratios": {"1 worker / in-process": found["1 worker"]["speedup"],
                       "2 workers / 1 worker": found["2 workers"]["speedup"] / found["1 worker"]["speedup"],
                       "2 workers / in-process": found["2 workers"]["speedup"],
                       "2 processes, no Ray / in-process": found["2 processes, no Ray"]["speedup"],
                       "2 workers / 2 processes, no Ray": found["2 workers"]["speedup"]
                       / found["2 processes, no Ray"]["speedup"]}}


@ray.remote(num_cpus=0)
class FakeWorker:
    """A task worker without the task compute: fetches Φ, waits ``compute_s`` in place of the
    compute, pushes a precomputed slice."""

    def __init__(self, size: int, num_tasks: int, wire_dtype: torch.dtype, slots: SlotSpec | None) -> None:
        self.part = FlatContribution(torch.full((size,), 1e-3), num_tasks, {"loss": float(num_tasks)})
        self.channel, self.wire_dtype = SliceChannel(slots), wire_dtype  # as a TaskWorker pushes

    def step(self, server: Any, version: int, phi: list[ray.ObjectRef], index: int,
             compute_s: float) -> tuple[float, float]:
        """(fetch, push) seconds: ``ray.get`` of Φ, then the push round trip (queueing behind the
        other pushes, transfer, and the apply + publish when this slice completes the step)."""
        start = time.perf_counter()
        self.channel.phi(phi[0])
        fetched = time.perf_counter()
        time.sleep(compute_s)
        pushed = time.perf_counter()
        part = self.part._replace(grad_sum=self.part.grad_sum.to(self.wire_dtype))  # a TaskWorker's cast
        status = self.channel.push(server, version, index, part)
        if status not in ("pending", "applied"):
            raise RuntimeError(f"push at version {version} answered {status!r}")
        return fetched - start, time.perf_counter() - pushed


def mlp_job(params: int) -> tuple[JobConfig, int]:
    """The sinusoid MLP job with hidden [h, h] of about ``params`` parameters (h² + 4h + 1), and
    its exact parameter count."""
    hidden = round((math.sqrt(16 + 4 * (params - 1)) - 4) / 2)
    job = load_job(SINUSOID_JOB, [f"model.hidden=[{hidden}, {hidden}]", "train.steps=1000000"])
    return job, sum(FlatLayout.of(initial_phi(job, build_model(job))).sizes)


def server_steps(job: JobConfig, params: int, workers: int, steps: int, compute_s: float,
                 wire: str, shared: bool) -> dict[str, list[float]]:
    """Sync steps of a real ``ParameterServer`` with fake workers: each step fans out the slices
    and ends when the server reports the version advanced; the pull of (version, Φ) before it is
    not timed (``RayRuntime`` takes them from the previous step's status), nor is ``compute_s``.
    The apply and publish are the server's own timing of them. Two warm-up steps first.
    ``shared``: slices and Φ go through shared buffers (as ``RayRuntime`` does on one node),
    else through the object store."""
    slices = task_slices(job.train.meta_batch, workers)
    timings: dict[str, list[float]] = {"step_s": [], "fetch_s": [], "push_s": [], "apply_s": [], "publish_s": []}
    slots = shared_slots.create(len(slices), params, wire) if shared else None
    with tempfile.TemporaryDirectory() as out, contextlib.ExitStack() as cleanup:
        if slots:
            cleanup.callback(shared_slots.remove, slots)
        server = ParameterServer.options(num_cpus=0, runtime_env={"env_vars": ALLOCATOR_ENV}).remote(
            job_to_dict(job), out, len(slices), slots)
        fakes = [FakeWorker.remote(params, b - a, WIRE_DTYPES[wire], slots) for a, b in slices]
        ray.get([f.__ray_ready__.remote() for f in fakes] + [server.status.remote()])
        for i in range(2 + steps):
            version, phi = ray.get(server.pull.remote())
            start = time.perf_counter()
            parts = ray.get([f.step.remote(server, version, phi, index, compute_s) for index, f in enumerate(fakes)])
            status = ray.get(server.status.remote())
            if status["version"] != version + 1:
                raise RuntimeError(f"step {version} was not applied")
            if i >= 2:
                timings["step_s"].append(time.perf_counter() - start - compute_s)
                timings["fetch_s"].append(max(fetch for fetch, _ in parts))
                timings["push_s"].append(max(push for _, push in parts))
                timings["apply_s"].append(status["last_step_s"]["apply"])
                timings["publish_s"].append(status["last_step_s"]["publish"])
        for actor in (server, *fakes):
            ray.kill(actor, no_restart=True)
    return timings


def server_cost(sizes: list[str], workers: list[int], steps: dict[str, int], gaps_s: list[float],
                wires: list[str], transports: list[str]) -> list[dict[str, Any]]:
    """Case 3: ms per sync step by model size, slice dtype, transport, compute gap and worker
    count, with its split. The transports of one configuration run back to back."""
    rows = []
    for name in sizes:
        job, params = mlp_job(PS_SIZES[name])
        for wire in wires:
            for gap in gaps_s:
                for count in workers:
                    for transport in transports:
                        timings = server_steps(job, params, count, steps[name], gap, wire, transport == "shared")
                        medians_ms = {k.removesuffix("_s") + "_ms": 1000 * statistics.median(v) for k, v in timings.items()}
                        row = {"size": name, "params": params, "hidden": job.model.hidden[0], "wire": wire,
                               "transport": transport, "workers": count, "compute_gap_ms": 1000 * gap,
                               "steps": steps[name], **medians_ms, "all_s": timings}
                        rows.append(row)
                        print(f"  {name} ({params:,} params), {wire} slices via {transport}, {1000 * gap:.0f} ms compute "
                              f"gap, {count} workers: {row['step_ms']:.1f} ms/step", flush=True)
    return rows


def sync_vs_async(budget_s: float, test_tasks: int) -> dict[str, dict[str, Any]]:
    """Case 4: 2 workers, sync then async (staleness 2), each for ``budget_s`` of training, then
    the meta-test on ``test_tasks`` tasks. The async loops are stopped at the budget, before
    the test, so both are tested at the Φ their step count says."""
    found = {}
    for mode in ("sync", "async"):
        job = omniglot_job(2, (f"runtime.mode={mode}", "runtime.staleness=2", f"eval.tasks={test_tasks}"))
        with ray_runtime(job) as runtime:
            start = time.perf_counter()
            while time.perf_counter() - start < budget_s:
                runtime.advance()
            if mode == "async":
                ray.get(runtime.server.stop.remote())
                ray.wait(runtime.loops, num_returns=len(runtime.loops), timeout=120)
            elapsed = time.perf_counter() - start
            info = runtime.info()
            report = runtime.test()
        steps = runtime.version
        found[mode] = {"steps": steps, "seconds": elapsed, "tasks_per_s": steps * job.train.meta_batch / elapsed,
                       "test_accuracy": report["accuracy"], "test_ci95": report["ci95"], "test_tasks": test_tasks,
                       "stale_contributions": info["stale_contributions"]}
        print(f"  {mode}: {steps} steps in {elapsed:.1f} s, {found[mode]['tasks_per_s']:.1f} tasks/s, "
              f"test accuracy {report['accuracy']:.3f} ± {report['ci95']:.3f}", flush=True)
    return found


def worker_scaling(configs: list[tuple[int, tuple[str, ...]]], steps: int) -> list[dict[str, Any]]:
    """Cases 5-6: tasks/s of ``advance()`` for each (workers, extra settings) of the Omniglot job,
    over ``steps`` steps after two warm-up steps; workers 0 is the in-process runtime."""
    rows = []
    for workers, extra in configs:
        job = omniglot_job(workers, extra)
        if workers == 0:
            with tempfile.TemporaryDirectory() as out:
                runtime = LocalRuntime(job, Location(out), None, torch.device(job.runtime.device))
                timed_steps(runtime, 2)
                seconds = timed_steps(runtime, steps)
        else:
            with ray_runtime(job) as runtime:
                timed_steps(runtime, 2)
                seconds = timed_steps(runtime, steps)
        row = {"workers": workers, "settings": list(extra), "meta_batch": job.train.meta_batch, "path": runtime.path,
               "worker_gpus": job.runtime.worker_gpus, "steps": steps, "step_s": seconds,
               "tasks_per_s": job.train.meta_batch / statistics.median(seconds)}
        rows.append(row)
        print(f"  {workers} workers {' '.join(extra)}: {row['tasks_per_s']:.1f} tasks/s", flush=True)
    return rows


CPU_SCALING_WORKERS = (1, 4, 8)  # of 1 CPU and 1 thread each, on a machine of 16 cores
GPU_SHARES = ((1, 1.0), (2, 0.5), (4, 0.25))  # (workers, GPU fraction each): one GPU in all


def cpu_scaling(steps: int) -> list[dict[str, Any]]:
    """Case 5: the job on 1, 4 and 8 workers of 1 CPU each (per-task loop path)."""
    return worker_scaling([(n, ()) for n in CPU_SCALING_WORKERS if n <= (os.cpu_count() or 1) - 1], steps)


def gpu_sharing(steps: int, meta_batches: tuple[int, ...]) -> list[dict[str, Any]]:
    """Case 6: one GPU as one whole-GPU worker, 2 × 0.5 or 4 × 0.25 (batched path), against the
    in-process runtime on the same GPU, at each meta-batch size."""
    configs = []
    for meta_batch in meta_batches:
        gpu = ("runtime.path=batched", "runtime.device=cuda", f"train.meta_batch={meta_batch}")
        configs.append((0, gpu))
        configs += [(n, (*gpu, f"runtime.worker_gpus={share}")) for n, share in GPU_SHARES]
    return worker_scaling(configs, steps)


TRANSLATION_JOB = ROOT / "jobs" / "translation_meta.yaml"


def translation_throughput(steps: int) -> list[dict[str, Any]]:
    """Case 7: target tokens per second of first-order MAML on translation tasks
    (jobs/translation_meta.yaml) in-process and on 1 and 2 workers of 1 CPU, 1 thread each.
    Tokens are the real (unpadded) target tokens of every task's support and query sets."""
    rows = []
    for workers in (0, 1, 2):
        job = load_job(TRANSLATION_JOB, [f"runtime.workers={workers}", "runtime.threads=1", "runtime.worker_cpus=1",
                                         "train.steps=1000000", "train.val_every=0", "runtime.path=loop"])
        sampler = build_sampler(job)
        with contextlib.ExitStack() as stack:
            if workers == 0:
                out = stack.enter_context(tempfile.TemporaryDirectory())
                runtime = LocalRuntime(job, Location(out), None, torch.device("cpu"))
            else:
                runtime = stack.enter_context(ray_runtime(job))
            timed_steps(runtime, 2)
            first = runtime.version
            seconds = timed_steps(runtime, steps)
        tokens = []
        for step in range(first, first + steps):
            batch = sampler.sample("train", step, 0, job.train.meta_batch)
            tokens.append(int(sum(((tgt[..., 1:] != 0).sum() for _, tgt in (batch.support, batch.query)))))
        rates = [n / s for n, s in zip(tokens, seconds)]
        row = {"workers": workers, "meta_batch": job.train.meta_batch, "steps": steps, "step_s": seconds,
               "tokens_per_step": tokens, "tokens_per_s": statistics.median(rates)}
        rows.append(row)
        print(f"  {workers} workers: {row['tokens_per_s']:.0f} target tokens/s", flush=True)
    return rows


def print_tables(results: dict[str, Any]) -> None:
    if "throughput" in results:
        print_throughput(results["throughput"])
    if "server" in results:
        print_server(results["server"])
    if "sync_vs_async" in results:
        print_sync_vs_async(results["sync_vs_async"])
    for case in ("cpu_scaling", "gpu_sharing"):
        if case in results:
            print_scaling(case, results[case])
    if "translation" in results:
        rows = results["translation"]
        print(f"\ntranslation, first-order MAML (jobs/translation_meta.yaml), median of {rows[0]['steps']} steps")
        print(f"{'workers':>7} {'s/step':>7} {'tokens/s':>9} {'vs in-process':>13}")
        for row in rows:
            print(f"{row['workers']:>7} {statistics.median(row['step_s']):>7.2f} {row['tokens_per_s']:>9.0f} "
                  f"{row['tokens_per_s'] / rows[0]['tokens_per_s']:>12.2f}×")


def print_scaling(case: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{case}: Omniglot 5w1s second-order MAML, median of {rows[0]['steps']} steps")
    print(f"{'workers':>7} {'GPU each':>8} {'meta-batch':>10} {'path':>8} {'tasks/s':>8} {'vs first':>8}")
    first: dict[int, float] = {}
    for row in rows:
        base = first.setdefault(row["meta_batch"], row["tasks_per_s"])
        print(f"{row['workers']:>7} {row['worker_gpus']:>8g} {row['meta_batch']:>10} {row['path']:>8} "
              f"{row['tasks_per_s']:>8.1f} {row['tasks_per_s'] / base:>7.2f}×")


def print_throughput(t: dict[str, Any]) -> None:
    print(f"\nOmniglot 5w1s second-order MAML, meta-batch 32: medians of {t['pairs']} alternating step pairs")
    print(f"{'runtime':<20} {'tasks/s':>8} {'vs in-process':>14}")
    print(f"{'in-process':<20} {t['in_process_tasks_per_s']:>8.1f} {'1.00×':>14}")
    for name, run in t["runs"].items():
        print(f"{name:<20} {run['tasks_per_s']:>8.1f} {run['speedup']:>13.2f}×")
    for name, ratio in t["ratios"].items():
        verdict = f" (target ≥ {TARGETS[name]}×: {'met' if ratio >= TARGETS[name] else 'missed'})" if name in TARGETS else ""
        print(f"{name}: {ratio:.2f}×{verdict}")


def print_server(server: list[dict[str, Any]]) -> None:
    print("\nParameter server, ms per sync step (median): step = fetch + push (push includes apply, publish),")
    print("the fake workers' compute gap not counted")
    print(f"{'size':<5} {'params':>11} {'wire':>5} {'via':>6} {'gap ms':>6} {'workers':>7} {'step':>8} {'fetch':>8} "
          f"{'push':>8} {'apply':>8} {'publish':>8}")
    for row in server:
        print(f"{row['size']:<5} {row['params']:>11,} {row['wire']:>5} {row['transport']:>6} {row['compute_gap_ms']:>6.0f} "
              f"{row['workers']:>7} {row['step_ms']:>8.1f} {row['fetch_ms']:>8.1f} {row['push_ms']:>8.1f} "
              f"{row['apply_ms']:>8.1f} {row['publish_ms']:>8.1f}")
    for size, limit in PS_TARGET_MS.items():
        for key in sorted({(row["wire"], row["transport"], row["compute_gap_ms"]) for row in server}):
            worst = max((row["step_ms"] for row in server
                         if (row["size"], row["wire"], row["transport"], row["compute_gap_ms"]) == (size, *key)),
                        default=None)
            if worst is not None:
                print(f"{size}, {key[0]} slices via {key[1]}, {key[2]:.0f} ms gap: slowest {worst:.1f} ms/step "
                      f"(target < {limit:g} ms: {'met' if worst < limit else 'missed'})")


def print_sync_vs_async(modes: dict[str, dict[str, Any]]) -> None:
    print("\nsync vs async, 2 workers, same wall-clock budget (one seed)")
    print(f"{'mode':<6} {'steps':>6} {'tasks/s':>8} {'test accuracy':>20} {'stale':>6}")
    for mode, row in modes.items():
        accuracy = f"{row['test_accuracy']:.3f} ± {row['test_ci95']:.3f}"
        print(f"{mode:<6} {row['steps']:>6} {row['tasks_per_s']:>8.1f} {accuracy:>20} {row['stale_contributions']:>6}")


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke version (~2 minutes)")
    parser.add_argument("--pairs", type=int, help="alternating step pairs per comparison in cases 1-2 (default 15; quick 3)")
    parser.add_argument("--budget", type=float, help="seconds of training per mode in case 4 (default 60; quick 15)")
    parser.add_argument("--test-tasks", type=int, help="meta-test tasks in case 4 (default 200; quick 20)")
    parser.add_argument("--cases", default="1234", help="which cases to run, e.g. 3 (cases 1 and 2 run together); "
                        "5 (1/4/8 CPU workers) and 6 (GPU shares) are for a machine of 16 cores and a GPU; "
                        "7: translation tokens/s on 0-2 workers (needs $DISTMETA_TRANSLATION)")
    parser.add_argument("--contributions", default="fp32", help="slice dtypes on the wire in case 3: fp32, bf16")
    parser.add_argument("--transports", default="shared,store",
                        help="how slices and Φ travel in case 3: shared (buffers in /dev/shm), store (object store)")
    parser.add_argument("--sizes", help=f"model sizes of case 3, comma-separated, of {', '.join(PS_SIZES)}")
    parser.add_argument("--scaling-steps", type=int, default=8, help="timed steps per configuration in cases 5-7")
    parser.add_argument("--gap-ms", type=float, default=100.0,
                        help="case 3 runs back to back, and again with the fake workers waiting this long in place of "
                             "the compute (not counted), as real steps are spaced")
    parser.add_argument("--json", default="bench/results/ray_runtime.json")
    args = parser.parse_args()
    pairs = args.pairs or (3 if args.quick else 15)
    budget = args.budget or (15.0 if args.quick else 60.0)
    test_tasks = args.test_tasks or (20 if args.quick else 200)
    sizes = args.sizes.split(",") if args.sizes else ["0.1M", "1M"] if args.quick else list(PS_SIZES)
    workers = [1, 2] if args.quick else [1, 2, 4]
    ps_steps = {name: 3 for name in sizes} if args.quick else PS_STEPS
    torch.set_num_threads(1)
    started = time.perf_counter()
    results: dict[str, Any] = {"command": " ".join(["python"] + sys.argv), "torch": torch.__version__,
                               "ray": ray.__version__, "cpu": cpu_name(), "cpus": os.cpu_count(),
                               "load_avg_start": os.getloadavg()}
    print(f"torch {torch.__version__}, ray {ray.__version__}, {results['cpu']} × {results['cpus']}, "
          f"load {results['load_avg_start'][0]:.2f}")
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        if "1" in args.cases or "2" in args.cases:
            print("cases 1-2: in-process vs 1 and 2 Ray workers", flush=True)
            results["throughput"] = throughput_cases(pairs)
        if "3" in args.cases:
            print("case 3: parameter-server cost", flush=True)
            results["server"] = server_cost(sizes, workers, ps_steps, [0.0, args.gap_ms / 1000],
                                            args.contributions.split(","), args.transports.split(","))
        if "4" in args.cases:
            print("case 4: sync vs async", flush=True)
            results["sync_vs_async"] = sync_vs_async(budget, test_tasks)
        if "5" in args.cases:
            print("case 5: CPU worker scaling", flush=True)
            results["cpu_scaling"] = cpu_scaling(args.scaling_steps)
        if "7" in args.cases:
            print("case 7: translation tokens/s", flush=True)
            results["translation"] = translation_throughput(args.scaling_steps)
        if "6" in args.cases:
            print("case 6: fractional GPU workers", flush=True)
            results["gpu"] = torch.cuda.get_device_name()
            results["gpu_sharing"] = gpu_sharing(args.scaling_steps, (32, 128))
    finally:
        ray.shutdown()
    results["load_avg_end"] = os.getloadavg()
    results["total_s"] = time.perf_counter() - started
    print_tables(results)
    print(f"\ntotal {results['total_s']:.0f} s, load {results['load_avg_end'][0]:.2f} at the end")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    restart_with_allocator_env()  # as the distmeta command runs
    main()
