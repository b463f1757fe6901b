"""Ray Tune sweeps: bad spaces fail before any trial; a smoke sweep ranks the inner learning
rate sensibly, stops trials early, reports; a killed sweep driver resumes without redoing trials."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray_cluster import kill, process_tree

from distmeta.cli import main
from distmeta.config import ConfigError, load_job
from distmeta.sweep import load_sweep

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "sweep_sinusoid_smoke.yaml"


def sweep_file(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load(SMOKE.read_text()) | {"base": str(REPO / "jobs" / "sinusoid_smoke.yaml")} | changes
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"space": {"algorithm.inner_lr": {"grid": [0.01, -0.1]}}},
     "space.algorithm.inner_lr: -0.1 makes an invalid job: algorithm.inner_lr: must be finite and >= 0"),
    ({"space": {"algorithm.inner_steps": {"choice": []}}}, "space.algorithm.inner_steps.choice: must be a non-empty"),
    ({"space": {"algorithm.inner_rate": {"grid": [0.1]}}}, "algorithm.inner_rate: unknown key"),
    ({"space": {"algorithm.inner_lr": {"loguniform": [0.0, 1.0]}}}, "must be [low, high] with low < high and low > 0"),
    ({"space": {"algorithm.inner_lr": {"normal": [0, 1]}}}, "space.algorithm.inner_lr: expected one of"),
    ({"metric": "val_accuracy"}, "metric: val_accuracy does not exist for sinusoid tasks"),
    ({"budget": {"workers": 0}}, "budget.workers: must be >= 1"),
    ({"trials": 3}, "trials: unknown key"),
    ({"space": {"runtime.workers": {"grid": [1, 3]}}}, "space.runtime.workers: every trial gets it from budget.*"),
    ({"space": {"train.val_every": {"grid": [100, 200]}}},
     "space.train.val_every: 200 makes a job trials cannot run: train.checkpoint_every: trials report a validation"),
])
def test_a_bad_sweep_is_a_clear_error_before_any_trial(tmp_path, changes, message):
    with pytest.raises(ConfigError) as error:
        load_sweep(sweep_file(tmp_path, **changes))
    assert message in str(error.value)


def read_results(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_smoke_sweep_ranks_inner_lr_stops_early_and_writes_a_runnable_best_job(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", str(SMOKE), "--out", str(out)]) == 0
    rows = read_results(out)
    assert len(rows) == 8 and {r["algorithm.inner_steps"] for r in rows} == {"1", "2"}
    best_mse: dict[float, float] = {}
    for r in rows:
        lr = float(r["algorithm.inner_lr"])
        best_mse[lr] = min(best_mse.get(lr, float("inf")), float(r["val_mse"]))
    assert sorted(best_mse) == [0.0, 0.0001, 0.01, 0.03]
    assert min(best_mse[0.0], best_mse[0.0001]) > max(best_mse[0.01], best_mse[0.03])  # adapting beats not adapting
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] >= 1 and summary["best_config"]["algorithm.inner_lr"] in (0.01, 0.03)
    assert summary["stopped_early"] == sum(r["status"] == "stopped early" for r in rows)
    assert all(r["status"] == ("done" if int(r["step"]) == 600 else "stopped early") for r in rows)
    assert summary["best_test"]["tasks"] == 200 and summary["best_test"]["split"] == "test"
    best = load_job(out / "best_job.yaml")
    assert best.algorithm.inner_lr == summary["best_config"]["algorithm.inner_lr"] and best.runtime.workers == 1
    assert (out / "heatmap.png").stat().st_size > 10_000
    assert "stopped early; best" in capsys.readouterr().out


@pytest.mark.slow
def test_a_killed_sweep_driver_resumes_without_rerunning_finished_trials(tmp_path):
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "distmeta.cli", "sweep", str(SMOKE), "--out", str(out)]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not any("done: " in log.read_text() for log in out.glob("trials/*/train.log")):  # a trial finished:
        assert driver.poll() is None and time.monotonic() < deadline, "the sweep ended or stalled before a trial finished"
        time.sleep(0.5)  # its summary.json is written just before that line
    time.sleep(2)  # let Tune record the finished trial
    kill(process_tree(driver.pid))  # the driver and the local Ray it started, as a crash would
    driver.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trials/*/summary.json")
                if "done: " in (p.parent / "train.log").read_text()}  # (a kill may fall between the two)
    assert main(["sweep", str(SMOKE), "--out", str(out), "--resume"]) == 0
    assert len(read_results(out)) == 8
    for trial, mtime in finished.items():
        assert (out / "trials" / trial / "summary.json").stat().st_mtime_ns == mtime, f"{trial} was re-run"
        assert (out / "trials" / trial / "train.log").read_text().count("done: ") == 1
