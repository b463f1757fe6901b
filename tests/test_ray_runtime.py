"""Task-worker actors on a local Ray: same Φ as in-process, survives a killed worker."""
from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch

from distmeta.checkpoint import checkpoints, load_checkpoint
from distmeta.cli import main
from distmeta.config import job_to_dict, load_job
from distmeta.runtime.ray_executor import RayExecutor, task_slices
from distmeta.train import train

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance of this test module alone, shut down at its end."""
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def job(workers: int, steps: int = 5):
    return load_job(JOBS / "sinusoid_smoke.yaml", [f"train.steps={steps}", "train.log_every=5", "train.val_every=0",
                                                    "train.checkpoint_every=5", "eval.tasks=10", "runtime.path=batched",
                                                    f"runtime.workers={workers}", "runtime.worker_cpus=1"])


def final_phi(run_dir: Path) -> dict:
    return load_checkpoint(checkpoints(run_dir / "checkpoints")[-1])["phi"]


def test_task_slices_cover_the_meta_batch_in_order():
    assert task_slices(25, 3) == [(0, 8), (8, 17), (17, 25)]
    assert task_slices(2, 4) == [(0, 1), (1, 2)]


def test_phi_after_five_steps_matches_in_process_for_1_2_3_workers(local_ray, tmp_path, capsys):
    train(job(0), tmp_path / "local")
    reference = final_phi(tmp_path / "local")
    for workers in (1, 2):
        summary = train(job(workers), tmp_path / f"w{workers}")
        assert summary["workers"] == workers
    assert main(["train", str(JOBS / "sinusoid_smoke.yaml"), "--workers", "3", "--out", str(tmp_path / "w3"),
                 *sum((["--set", o] for o in ("train.steps=5", "train.log_every=5", "train.val_every=0",
                                              "eval.tasks=10", "runtime.path=batched")), [])]) == 0
    for workers in (1, 2, 3):
        phi = final_phi(tmp_path / f"w{workers}")
        for name, value in reference.items():
            if workers == 1:
                assert torch.equal(phi[name], value), name  # one slice: the very same arithmetic
            assert torch.allclose(phi[name], value, rtol=0, atol=1e-6), (workers, name)


class KillingExecutor(RayExecutor):
    """Kills worker 1 (Ray restarts it) just before meta-step ``kill_at`` is dispatched."""

    def __init__(self, *args, kill_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.kill_at, self.killed_pid = kill_at, None

    def contribution(self, phi, step, meta_batch):
        if step == self.kill_at:
            self.killed_pid = ray.get(self.workers[1].pid.remote())
            ray.kill(self.workers[1], no_restart=False)
        return super().contribution(phi, step, meta_batch)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_ends_with_the_same_phi(local_ray, tmp_path):
    undisturbed = job(2, steps=6)
    train(undisturbed, tmp_path / "calm")
    executor = KillingExecutor(job_to_dict(undisturbed), 2, kill_at=3)
    try:
        train(undisturbed, tmp_path / "killed", executor=executor)
        assert executor.killed_pid is not None
        assert ray.get(executor.workers[1].pid.remote()) != executor.killed_pid  # a new process served the rest
    finally:
        executor.shutdown()
    calm, killed = final_phi(tmp_path / "calm"), final_phi(tmp_path / "killed")
    for name in calm:
        assert torch.equal(calm[name], killed[name]), name


def test_more_workers_than_the_cluster_has_fails_fast(local_ray):
    with pytest.raises(ValueError, match=r"4 workers × 1 CPU = 4 CPU, but the Ray cluster has 3"):
        RayExecutor(job_to_dict(job(4)), 4, cpus_per_worker=1.0)
