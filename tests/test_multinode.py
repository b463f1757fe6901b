"""distmeta on a real multi-node Ray cluster: a head without CPUs and two 1-CPU worker nodes, all
``ray start``-ed on this machine with token authentication (see ``ray_cluster.py``).

A training job submitted through the Ray Jobs API must spread its two task workers over both
worker nodes (STRICT_SPREAD) and write its checkpoint and summary to a ``file://`` storage URI;
a driver pointed at an address where no cluster listens must fail fast instead of hanging.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from ray_cluster import VENV_BIN, LocalRayCluster, alive, free_port

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

REPO = Path(__file__).resolve().parents[1]
# What a job's working_dir upload leaves out. Ray 2.60 already skips what .gitignore lists
# (.venv-bench, runs, caches) and its defaults (.git, .venv, venv, __pycache__), but not .gpu
# (40+ MB); listed explicitly so the upload stays small whatever .gitignore says.
UPLOAD_EXCLUDES = ["/.venv", "/.venv-bench", "/.gpu", "/runs", "/.git", "/.cache", "/bench/_work",
                   "/.pytest_cache", "/.ruff_cache", "*.egg-info", "__pycache__"]
JOB_TIMEOUT_S = 180.0
UNREACHABLE_TIMEOUT_S = 60.0

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="follows processes in /proc")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRayCluster]:
    """One 3-node cluster for the module (starting it takes ~13 s); on teardown every process it
    started is ended by PID, and none may be left."""
    with LocalRayCluster(tmp_path_factory.mktemp("ray"), workers=2) as ray_cluster:
        yield ray_cluster
    assert not alive(ray_cluster.processes), "Ray processes left after stopping the cluster"


def wait_for_job(client: JobSubmissionClient, job_id: str, timeout_s: float) -> str:
    """The job's final status, or the status it had when ``timeout_s`` ran out (then stopped)."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                            JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            return f"{status} after {timeout_s:g} s (stopped)"
        time.sleep(0.5)
    return str(status)


@pytest.mark.slow
def test_a_job_trains_on_both_worker_nodes_and_writes_to_the_storage_uri(
        cluster: LocalRayCluster, tmp_path: Path) -> None:
    """The job's driver runs on the head (no CPUs), so each task worker needs a worker node."""
    storage = tmp_path / "storage"
    entrypoint = shlex.join([
        "distmeta", "train", "jobs/sinusoid_smoke.yaml", "--workers", "2",
        "--set", "runtime.placement=STRICT_SPREAD", "--set", "train.steps=10",
        "--set", "train.checkpoint_every=5", "--set", "eval.tasks=20", "--out", storage.as_uri()])
    client = cluster.job_client()
    # Unbuffered: the logs of a job that hangs show how far it got.
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={
        "working_dir": str(REPO), "excludes": UPLOAD_EXCLUDES, "env_vars": {"PYTHONUNBUFFERED": "1"}})
    status = wait_for_job(client, job_id, JOB_TIMEOUT_S)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", f"job {job_id} ended {status}; its logs:\n{logs}"

    assert (storage / "checkpoints" / "step_00000010.pt").is_file(), logs
    assert (storage / "summary.json").is_file(), logs
    summary = json.loads((storage / "summary.json").read_text())
    nodes = cluster.nodes()
    head = {n["node_id"] for n in nodes if n["is_head_node"]}
    workers = {n["node_id"] for n in nodes if not n["is_head_node"]}
    assert len(head) == 1 and len(workers) == 2, nodes
    worker_nodes = summary.get("worker_nodes")
    assert isinstance(worker_nodes, list) and len(worker_nodes) == 2, f"worker_nodes: {worker_nodes!r}"
    assert set(worker_nodes) == workers, f"workers on {worker_nodes}; worker nodes {workers}, head {head}"
    assert summary["transport"] == "object store"  # the workers are not on the driver's node

    # The repo as the job saw it (unpacked on this machine): the code, none of the excluded dirs.
    unpacked = cluster.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files"
    uploads = [p for p in unpacked.iterdir() if p.is_dir()]
    assert uploads and all((p / "jobs" / "sinusoid_smoke.yaml").is_file() for p in uploads), uploads
    for upload in uploads:
        assert not [e for e in UPLOAD_EXCLUDES if e.startswith("/") and (upload / e[1:]).exists()], upload


def test_a_driver_pointed_where_no_cluster_listens_fails_fast(tmp_path: Path) -> None:
    """No cluster needed: the address is a free port. ``ray.init`` alone keeps retrying for
    minutes; distmeta must exit non-zero within a minute and name the address."""
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64,
           "PATH": os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")])}
    env.pop("RAY_ADDRESS", None)
    command = [str(VENV_BIN / "distmeta"), "train", "jobs/sinusoid_smoke.yaml", "--workers", "1",
               "--address", f"127.0.0.1:{port}", "--out", str(tmp_path / "run")]
    started = time.monotonic()
    try:
        result = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=UNREACHABLE_TIMEOUT_S + 30, start_new_session=True)
    except subprocess.TimeoutExpired as hung:
        stderr = hung.stderr.decode(errors="replace") if isinstance(hung.stderr, bytes) else hung.stderr
        pytest.fail(f"distmeta still waiting after {hung.timeout:g} s for 127.0.0.1:{port}:\n{stderr}")
    elapsed = time.monotonic() - started
    assert result.returncode != 0, result.stdout + result.stderr
    assert elapsed < UNREACHABLE_TIMEOUT_S, f"took {elapsed:.0f} s:\n{result.stderr}"
    assert f":{port}" in result.stderr, result.stderr  # Ray itself would name 127.0.0.1 by the host's IP


@pytest.mark.slow
def test_a_job_waits_for_the_cluster_to_scale_up_to_its_workers(cluster: LocalRayCluster, tmp_path: Path) -> None:
    """Three 1-CPU workers on two 1-CPU nodes: with runtime.scale_up_timeout_s the job waits
    (where it would fail fast without) until a third node joins, as an autoscaler would add it."""
    storage = tmp_path / "storage"
    entrypoint = shlex.join([
        "distmeta", "train", "jobs/sinusoid_smoke.yaml", "--workers", "3", "--set", "runtime.scale_up_timeout_s=150",
        "--set", "train.steps=4", "--set", "eval.tasks=10", "--out", storage.as_uri()])
    client = cluster.job_client()
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={
        "working_dir": str(REPO), "excludes": UPLOAD_EXCLUDES, "env_vars": {"PYTHONUNBUFFERED": "1"}})
    deadline = time.monotonic() + 90
    while "waiting up to 150 s for it to scale up" not in client.get_job_logs(job_id):
        assert time.monotonic() < deadline, f"the job never waited for a scale-up; its logs:\n{client.get_job_logs(job_id)}"
        time.sleep(1)
    cluster.add_worker(cpus=1)
    status = wait_for_job(client, job_id, JOB_TIMEOUT_S)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", f"job {job_id} ended {status}; its logs:\n{logs}"
    summary = json.loads((storage / "summary.json").read_text())
    assert summary["workers"] == 3 and len(set(summary["worker_nodes"])) == 3, summary
