"""The parameter-server runtime on a local Ray: same Φ as in-process for any worker count,
and the same Φ after a killed worker, a killed server or a killed driver."""
from __future__ import annotations

import fcntl
import http.server
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from distmeta.checkpoint import checkpoints, load_checkpoint
from distmeta.cli import main
from distmeta.components import build_model
from distmeta.config import load_job
from distmeta.runtime import ray_runtime, shared_slots
from distmeta.runtime.local import initial_phi
from distmeta.runtime.parameter_store import FlatContribution, NonFiniteError
from distmeta.runtime.ray_runtime import RayRuntime, task_slices
from distmeta.storage import Location
from distmeta.train import train

JOBS = Path(__file__).resolve().parents[1] / "jobs"
QUICK = ["train.log_every=2", "train.val_every=0", "train.checkpoint_every=2", "eval.tasks=10", "runtime.path=batched"]


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance of this test module alone, shut down at its end."""
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def job(workers: int, steps: int = 6, *overrides: str):
    return load_job(JOBS / "sinusoid_smoke.yaml", [f"train.steps={steps}", *QUICK, f"runtime.workers={workers}",
                                                    "runtime.worker_cpus=1", *overrides])


def final_phi(run_dir: Path) -> dict:
    return load_checkpoint(checkpoints(run_dir / "checkpoints")[-1])["phi"]


def assert_same_phi(a: Path, b: Path) -> None:
    for name, value in final_phi(a).items():
        assert torch.equal(value, final_phi(b)[name]), name


def test_task_slices_cover_the_meta_batch_in_order():
    assert task_slices(25, 3) == [(0, 8), (8, 17), (17, 25)]
    assert task_slices(2, 4) == [(0, 1), (1, 2)]


def test_phi_after_five_steps_matches_in_process_for_1_2_3_workers(local_ray, tmp_path):
    local = train(job(0, 5), tmp_path / "local")
    reference = final_phi(tmp_path / "local")
    for workers in (1, 2):
        summary = train(job(workers, 5), tmp_path / f"w{workers}")
        assert summary["workers"] == workers and summary["mode"] == "sync" and summary["transport"] == "shared memory"
        assert summary["restarts"] == {"workers": 0, "server": 0} and summary["rejected_contributions"] == 0
        if workers == 1:  # one slice: the very same arithmetic, to the bit
            assert summary["phi_sha256"] == local["phi_sha256"]
    assert main(["train", str(JOBS / "sinusoid_smoke.yaml"), "--workers", "3", "--out", str(tmp_path / "w3"),
                 *sum((["--set", o] for o in ("train.steps=5", *QUICK)), [])]) == 0
    for workers in (1, 2, 3):
        phi = final_phi(tmp_path / f"w{workers}")
        for name, value in reference.items():
            assert torch.allclose(phi[name], value, rtol=0, atol=1e-6), (workers, name)


def test_the_object_store_carries_a_sync_run_to_the_same_phi_as_shared_memory(local_ray, tmp_path, monkeypatch):
    before = set(shared_slots.ROOT.glob(f"{shared_slots.PREFIX}*"))
    shared = train(job(2, 3), tmp_path / "shared")
    monkeypatch.setattr(shared_slots, "available", lambda: False)  # as where /dev/shm is missing
    stored = train(job(2, 3), tmp_path / "stored")
    assert (shared["transport"], stored["transport"]) == ("shared memory", "object store")
    assert shared["phi_sha256"] == stored["phi_sha256"]
    assert set(shared_slots.ROOT.glob(f"{shared_slots.PREFIX}*")) == before  # removed when the run closed


def test_shared_buffers_of_a_driver_that_is_gone_are_removed_by_the_next_run():
    orphan, running = (shared_slots.ROOT / f"{shared_slots.PREFIX}test-{name}" for name in ("orphan", "running"))
    for folder in (orphan, running):
        folder.mkdir()
        (folder / "lock").touch()
    held = os.open(running / "lock", os.O_RDWR)  # as a live driver holds its lock
    fcntl.flock(held, fcntl.LOCK_EX)
    spec = shared_slots.create(2, 10, "bf16")
    try:
        assert not orphan.exists() and running.is_dir() and Path(spec.folder).is_dir()
        slots = shared_slots.Slots(spec, server=False)
        assert slots.phi.dtype == "float32" and slots.slices[1].dtype == "int16" and slots.slices[1].size == 10
        assert not slots.phi.flags.writeable and slots.slices[0].flags.writeable  # workers only write slices
        shared_slots.remove_orphans()
        assert Path(spec.folder).is_dir()  # its creator, this process, holds its lock
    finally:
        shared_slots.remove(spec)
        os.close(held)
        shutil.rmtree(running)
    assert not Path(spec.folder).exists()


class FaultyRuntime(RayRuntime):
    """Before step ``at`` is computed: kill a worker or the server (Ray restarts either),
    crash the driver, or push a non-finite slice to the server; or Ctrl-C while step ``at``
    is computed ("interrupt"), or in async mode right after a checkpoint from step ``at`` on
    that the server took a step ahead of the driver ("async interrupt"); or kill the server
    after step ``at`` - 1, just before the driver checkpoints it ("server before save")."""

    def __init__(self, *args, at: int, fault: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.fault, self.done = at, fault, False

    def advance(self):
        if self.fault == "async interrupt" and self.done:  # Ctrl-C while the driver polls the async server
            raise KeyboardInterrupt
        if self.version == self.at and not self.done and self.fault != "async interrupt":
            self.done = True
            if self.fault == "worker":
                ray.kill(self.workers[1], no_restart=False)
            elif self.fault == "worker for good":
                ray.kill(self.workers[1], no_restart=True)
            elif self.fault == "server":
                ray.kill(self.server, no_restart=False)
            elif self.fault == "driver":
                raise RuntimeError("simulated driver crash")
            elif self.fault == "interrupt":  # the driver's wait for the step's slices is what Ctrl-C breaks
                real_get = ray.get

                def interrupted(refs, *args, **kwargs):
                    if refs is not self.in_flight:
                        return real_get(refs, *args, **kwargs)
                    ray.get = real_get
                    raise KeyboardInterrupt

                ray.get = interrupted
            elif self.fault == "nan":
                version, _ = ray.get(self.server.pull.remote())
                size = ray.get(self.server.flat.remote()).size
                nan = FlatContribution(torch.full((size,), float("nan")), 4, {"loss": 1.0})
                verdict = ray.get(self.server.push.remote(version, 0, nan))  # found once the step's slices are in
                assert verdict == ("rejected" if len(self.slices) == 1 else "pending")
        return super().advance()

    def checkpoint(self, extra):
        if self.fault == "async interrupt" and self.version >= self.at and not self.done:
            self.done = True  # the server saves a step the driver has not taken in, then takes no more
            while ray.get(self.server.status.remote(False))["version"] <= self.version:
                time.sleep(0.002)
            ray.get(self.server.stop.remote())
        if self.fault == "server before save" and self.version == self.at and not self.done:
            self.done = True
            ray.kill(self.server, no_restart=False)  # asynchronous: the old process may still answer a call
            while ray.get(self.server.status.remote(False))["pid"] == self.server_pid:
                time.sleep(0.05)  # until the restarted server answers
        return super().checkpoint(extra)


def faulty(job_config, run_dir: Path, at: int, fault: str) -> FaultyRuntime:
    return FaultyRuntime(job_config, Location(run_dir), None, at=at, fault=fault)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_ends_with_the_same_phi(local_ray, tmp_path):
    calm = train(job(2), tmp_path / "calm")
    killed = train(job(2), tmp_path / "killed", runtime=faulty(job(2), tmp_path / "killed", at=3, fault="worker"))
    assert killed["restarts"]["workers"] == 1 and killed["restarts"]["server"] == 0
    assert killed["phi_sha256"] == calm["phi_sha256"]
    assert_same_phi(tmp_path / "calm", tmp_path / "killed")


@pytest.mark.slow
def test_a_killed_server_restarts_from_its_checkpoint_and_the_run_ends_with_the_same_phi(local_ray, tmp_path):
    calm = train(job(2), tmp_path / "calm")
    killed = train(job(2), tmp_path / "killed", runtime=faulty(job(2), tmp_path / "killed", at=5, fault="server"))
    assert killed["restarts"]["server"] == 1 and killed["steps"] == 6
    assert killed["phi_sha256"] == calm["phi_sha256"]
    log_text = (tmp_path / "killed" / "train.log").read_text()
    assert "restarted from its checkpoint at step 4: 1 step(s) of work lost" in log_text
    steps = [line.split(",")[0] for line in (tmp_path / "killed" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ["2", "4", "6"]  # the redone step was logged once


@pytest.mark.slow
def test_a_server_killed_between_a_step_and_its_checkpoint_is_never_checkpointed_under_the_wrong_step(
        local_ray, tmp_path):
    calm = train(job(2), tmp_path / "calm")
    reported = {}

    def on_checkpoint(step, where, rows):
        saved = load_checkpoint(where)
        reported[step] = (saved["step"], saved["elapsed_s"])

    killed = train(job(2), tmp_path / "killed", runtime=faulty(job(2), tmp_path / "killed", at=4,
                                                                fault="server before save"), on_checkpoint=on_checkpoint)
    assert killed["restarts"]["server"] == 1 and killed["phi_sha256"] == calm["phi_sha256"]
    assert {step: saved for step, (saved, _) in reported.items()} == {2: 2, 4: 4, 6: 6}  # step 4 saved once redone
    for path in checkpoints(tmp_path / "killed" / "checkpoints"):  # none rewritten with a later step's driver state
        saved = load_checkpoint(path)
        assert reported[saved["step"]] == (saved["step"], saved["elapsed_s"])
    assert "restarted from its checkpoint at step 2: 2 step(s) of work lost" in (tmp_path / "killed" / "train.log").read_text()
    steps = [line.split(",")[0] for line in (tmp_path / "killed" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ["2", "4", "6"]


@pytest.mark.slow
def test_a_server_killed_before_its_first_checkpoint_starts_over_to_the_same_phi(local_ray, tmp_path):
    calm = train(job(2, 4, "train.checkpoint_every=4"), tmp_path / "calm")
    killed = train(job(2, 4, "train.checkpoint_every=4"), tmp_path / "killed",
                   runtime=faulty(job(2, 4, "train.checkpoint_every=4"), tmp_path / "killed", at=2, fault="server"))
    assert killed["restarts"]["server"] == 1 and killed["phi_sha256"] == calm["phi_sha256"]


def test_a_worker_that_stays_dead_fails_the_run(local_ray, tmp_path):
    with pytest.raises(ray.exceptions.RayActorError):
        train(job(2, 4), tmp_path / "dead", runtime=faulty(job(2, 4), tmp_path / "dead", at=1, fault="worker for good"))


@pytest.mark.slow
def test_a_killed_driver_resumes_to_the_same_phi(local_ray, tmp_path):
    calm = train(job(2), tmp_path / "calm")
    with pytest.raises(RuntimeError, match="simulated driver crash"):
        train(job(2), tmp_path / "crashed", runtime=faulty(job(2), tmp_path / "crashed", at=5, fault="driver"))
    assert [p.name for p in checkpoints(tmp_path / "crashed" / "checkpoints")] == ["step_00000002.pt",
                                                                                    "step_00000004.pt"]
    assert main(["train", "--resume", str(tmp_path / "crashed")]) == 0
    assert "from step 4" in (tmp_path / "crashed" / "train.log").read_text()
    resumed = json.loads((tmp_path / "crashed" / "summary.json").read_text())
    assert resumed["steps"] == 6 and resumed["phi_sha256"] == calm["phi_sha256"]
    assert_same_phi(tmp_path / "calm", tmp_path / "crashed")


def test_ctrl_c_mid_step_checkpoints_the_step_that_lands_and_resumes_to_the_same_run(local_ray, tmp_path):
    every_step = job(2, 6, "train.log_every=1", "train.checkpoint_every=2")
    train(every_step, tmp_path / "calm")
    with pytest.raises(KeyboardInterrupt):
        train(every_step, tmp_path / "stopped", runtime=faulty(every_step, tmp_path / "stopped", at=2, fault="interrupt"))
    # step 2 (the third) was on its way when Ctrl-C came: it lands, is logged and checkpointed
    assert [p.name for p in checkpoints(tmp_path / "stopped" / "checkpoints")][-1] == "step_00000003.pt"
    assert main(["train", "--resume", str(tmp_path / "stopped")]) == 0
    rows = [(tmp_path / run / "metrics.csv").read_text().splitlines() for run in ("calm", "stopped")]
    assert len(rows[0]) == 7 and [r.split(",")[:2] for r in rows[0]] == [r.split(",")[:2] for r in rows[1]]
    assert_same_phi(tmp_path / "calm", tmp_path / "stopped")


def test_ctrl_c_in_async_mode_checkpoints_every_applied_step_with_its_window(local_ray, tmp_path):
    """The async server applies steps ahead of the driver and may already have saved a
    checkpoint under the final step; the one Ctrl-C leaves must still hold the driver's
    metrics window up to that step, so that a resume logs every step once."""
    run = tmp_path / "stopped"
    async_job = job(2, 14, "runtime.mode=async", "train.log_every=4", "train.checkpoint_every=3")
    with pytest.raises(KeyboardInterrupt):
        train(async_job, run, runtime=faulty(async_job, run, at=5, fault="async interrupt"))
    saved = load_checkpoint(checkpoints(run / "checkpoints")[-1])
    logged = [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert 5 <= saved["step"] < 14 and logged == list(range(4, saved["step"] + 1, 4))
    assert saved["window"].get("steps", 0) == saved["step"] - logged[-1]  # nothing applied is missing
    assert main(["train", "--resume", str(run)]) == 0
    logged = [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert logged == [4, 8, 12, 14] and json.loads((run / "summary.json").read_text())["steps"] == 14


def test_bf16_contributions_train_to_nearly_the_phi_of_fp32_ones(local_ray, tmp_path):
    train(job(2, 5), tmp_path / "fp32")
    train(job(2, 5, "runtime.contributions=bf16"), tmp_path / "bf16")
    start = initial_phi(job(2), build_model(job(2)))
    fp32, bf16 = final_phi(tmp_path / "fp32"), final_phi(tmp_path / "bf16")
    moved = max((fp32[n] - start[n]).abs().max().item() for n in start)
    apart = max((fp32[n] - bf16[n]).abs().max().item() for n in start)
    assert 0 < apart < 0.05 * moved, (apart, moved)  # rounded on the wire, yet the same training


def test_a_non_finite_slice_is_rejected_counted_and_the_step_still_applied(local_ray, tmp_path):
    for workers in (1, 2):
        calm = train(job(workers, 4), tmp_path / f"calm{workers}")
        poked = train(job(workers, 4), tmp_path / f"poked{workers}",
                      runtime=faulty(job(workers, 4), tmp_path / f"poked{workers}", at=2, fault="nan"))
        assert poked["rejected_contributions"] == 1 and poked["phi_sha256"] == calm["phi_sha256"]


def test_a_step_that_stays_non_finite_fails_after_retries(local_ray, tmp_path):
    with pytest.raises(NonFiniteError, match="stayed non-finite after 2 recomputations"):
        train(job(2, 4, "algorithm.inner_lr=1e30"), tmp_path / "nan")


def test_async_mode_trains_with_bounded_staleness(local_ray, tmp_path):
    summary = train(job(2, 40, "runtime.mode=async", "runtime.staleness=1", "train.log_every=10"), tmp_path / "async")
    assert summary["mode"] == "async" and summary["steps"] == 40 and summary["transport"] == "object store"
    assert summary["stale_contributions"] >= 0 and summary["restarts"] == {"workers": 0, "server": 0}
    rows = (tmp_path / "async" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["10", "20", "30", "40"]


def test_more_workers_than_the_cluster_has_fails_fast(local_ray, tmp_path):
    with pytest.raises(ValueError, match=r"4 workers × 1 CPU = 4 CPU, but the Ray cluster has 3.*"
                                         r"on an autoscaling cluster, set runtime.scale_up_timeout_s"):
        train(job(4), tmp_path / "big")


def test_an_impossible_placement_fails_fast(local_ray, tmp_path, monkeypatch):
    monkeypatch.setattr(ray_runtime, "PLACEMENT_TIMEOUT_S", 2.0)
    with pytest.raises(ValueError, match="cannot place 2 workers .* with STRICT_SPREAD on this cluster \\(1 live"):
        train(job(2, 4, "runtime.placement=STRICT_SPREAD"), tmp_path / "spread")


def test_unwritable_storage_and_unreachable_address_fail_fast(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    args = ["train", str(JOBS / "sinusoid_smoke.yaml"), "--workers", "1"]
    assert main([*args, "--out", str(blocker / "run")]) == 1
    assert "is not writable" in capsys.readouterr().err
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.perf_counter()
    assert main([*args, "--out", str(tmp_path / "run"), "--address", f"127.0.0.1:{port}"]) == 1
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in capsys.readouterr().err
    assert time.perf_counter() - start < 30
    web = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # a listener, not Ray
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{web.server_address[1]}"
        assert main([*args, "--out", str(tmp_path / "run"), "--address", address]) == 1
        assert f"something listens at {address} but it is not a Ray cluster" in capsys.readouterr().err
    finally:
        web.shutdown()
        web.server_close()
