"""The multilingual pre-training baseline on Ray Train: data-parallel joint training of Φ
on the source languages, with the same step function and optimizer arithmetic as every
other run (``LocalExecutor`` + ``ParameterStore``), the gradient summed across workers
with one all-reduce per update.

Each of the W workers computes its contiguous slice of the update's tasks, so W workers
see exactly the tasks one would. Rank 0 reports a checkpoint (Φ, optimizer, step) every
``train.checkpoint_every`` updates; a rerun with the same run folder continues from the
newest one (Ray Train restores its own run state).
"""
from __future__ import annotations

import logging
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from distmeta.compare.config import PretrainConfig
from distmeta.components import build_job_algorithm, build_job_optimizer, build_model, build_sampler
from distmeta.config import JobConfig, job_from_dict, job_to_dict
from distmeta.device import tree_to
from distmeta.runtime.local import LocalExecutor, initial_phi
from distmeta.runtime.parameter_store import FlatContribution, ParameterStore
from distmeta.runtime.ray_runtime import task_slices

log = logging.getLogger("distmeta.compare")
STATE_FILE = "state.pt"


def pretrain_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker's loop (``train_loop_per_worker``)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    job = job_from_dict(config["job"], "pre-training job")
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    model = build_model(job)
    executor = LocalExecutor(model, build_job_algorithm(job), build_sampler(job), job.runtime.path,
                             job.runtime.precision, device)
    state = None
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, weights_only=False)
        state = {**state, "phi": tree_to(state["phi"], device), "opt_state": tree_to(state["opt_state"], device)}
    store = ParameterStore(tree_to(initial_phi(job, model), device), build_job_optimizer(job), job.train.meta_batch,
                           state=state)
    start, stop = task_slices(job.train.meta_batch, world)[rank]
    keys: list[str] | None = None
    window: dict[str, float] = {}
    began, first = time.perf_counter(), store.version
    for step in range(store.version, job.train.steps):
        part = store.layout.flatten_contribution(executor.slice_contribution(store.phi(), step, start, stop))
        keys = keys or sorted(part.metrics)
        packed = torch.cat([part.grad_sum, torch.tensor([part.metrics[k] for k in keys], device=device)])
        dist.all_reduce(packed)  # the sum over workers: every worker then applies the same update
        size = part.grad_sum.numel()
        metrics = dict(zip(keys, packed[size:].tolist()))
        store.submit(step, 0, FlatContribution(packed[:size], job.train.meta_batch, metrics))
        for k, v in metrics.items():
            window[k] = window.get(k, 0.0) + v
        done = step + 1
        if done % job.train.log_every == 0 and rank == 0:
            rate = (done - first) / (time.perf_counter() - began)
            log.info("pretrain step %d/%d loss %.3f, %.2f steps/s, ETA %.0f s", done, job.train.steps,
                     window["loss"] / (job.train.meta_batch * job.train.log_every), rate, (job.train.steps - done) / rate)
            window = {}
        if done % job.train.checkpoint_every == 0 or done == job.train.steps:
            report = {"step": done, **{f"train_{k}": v / job.train.meta_batch for k, v in metrics.items()}}
            with tempfile.TemporaryDirectory() as folder:
                saved = None
                if rank == 0:  # every worker holds the same Φ; one copy is enough
                    torch.save(tree_to(store.state_dict(), "cpu"), Path(folder) / STATE_FILE)
                    saved = ray.train.Checkpoint.from_directory(folder)
                ray.train.report(report, checkpoint=saved)


def run_pretraining(job: JobConfig, folder: Path, resources: PretrainConfig) -> dict[str, torch.Tensor]:
    """Pre-train on Ray Train into ``folder`` (continuing a stopped run there) and return the
    final Φ. Needs a running Ray (the caller's)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        pretrain_worker,
        train_loop_config={"job": job_to_dict(job), "threads": max(1, int(resources.worker_cpus)),
                           "use_gpu": resources.use_gpu},
        scaling_config=ScalingConfig(num_workers=resources.workers, use_gpu=resources.use_gpu,
                                     resources_per_worker={"CPU": resources.worker_cpus}),
        run_config=RunConfig(name=folder.name, storage_path=str(folder.parent.absolute()),
                             checkpoint_config=CheckpointConfig(num_to_keep=job.train.keep_checkpoints)))
    interrupt = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    finally:  # fit() leaves its own Ctrl-C handler installed, which would swallow Ctrl-C in the stages after it
        if interrupt is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, interrupt)
    with result.checkpoint.as_directory() as saved:
        state = torch.load(Path(saved) / STATE_FILE, weights_only=False)
    if state["step"] != job.train.steps:
        raise RuntimeError(f"pre-training ended at step {state['step']} of {job.train.steps}")
    return state["phi"]
