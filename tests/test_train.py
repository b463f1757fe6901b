"""End to end: the CLI trains, checkpoints, evaluates, resumes and refuses NaNs."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distmeta import cli
from distmeta.checkpoint import CorruptCheckpointError, checkpoint_step, checkpoints, load_checkpoint
from distmeta.cli import main
from distmeta.components import build_job_algorithm, build_model, build_sampler
from distmeta.config import load_job
from distmeta.device import ALLOCATOR_ENV
from distmeta.runtime import LocalExecutor, LocalRuntime
from distmeta.storage import Location
from distmeta.train import NonFiniteError, train

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.mark.slow
def test_omniglot_smoke_job_learns_far_above_chance(omniglot_env, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(JOBS / "omniglot_5w1s_smoke.yaml"), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("algorithm", "steps", "wall_s", "tasks_per_s", "test_accuracy", "test_ci95", "test_tasks"):
        assert key in summary, key
    assert summary["steps"] == 150 and summary["test_tasks"] == 200
    # chance is 20% for 5 ways; the smoke run must be clearly above it
    assert summary["test_accuracy"] - summary["test_ci95"] > 0.5, summary
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(10, 151, 10))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert rows[4]["val_accuracy"] and float(rows[-1]["val_accuracy"]) > 0.4
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in checkpoints(out / "checkpoints")] == [f"step_{s:08d}.pt" for s in (50, 100, 150)]
    capsys.readouterr()

    assert main(["eval", str(out), "--tasks", "100", "--steps", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["tasks"] == 100 and report["steps"] == 5 and report["split"] == "test"
    assert report["accuracy"] - report["ci95"] > 0.5


def sinusoid_job(steps: int, *overrides: str):
    return load_job(JOBS / "sinusoid_smoke.yaml", [f"train.steps={steps}", "train.checkpoint_every=10",
                                                    "train.log_every=5", "eval.tasks=20", "train.val_every=0",
                                                    "runtime.path=batched", *overrides])


class FailingExecutor(LocalExecutor):
    """The in-process executor, but step ``fail_at`` crashes (or returns a NaN gradient)."""

    def __init__(self, job, fail_at: int, nan: bool = False):
        super().__init__(build_model(job), build_job_algorithm(job), build_sampler(job), "batched")
        self.fail_at, self.nan = fail_at, nan

    def contribution(self, phi, step, meta_batch):
        result = super().contribution(phi, step, meta_batch)
        if step == self.fail_at:
            if not self.nan:
                raise RuntimeError("simulated crash")
            result.grad_sum["layer1.weight"][0, 0] = float("nan")
        return result


def failing_runtime(job, run_dir: Path, fail_at: int, nan: bool = False) -> LocalRuntime:
    """The in-process runtime of a new run, computing with a FailingExecutor."""
    runtime = LocalRuntime(job, Location(run_dir), None, torch.device("cpu"))
    runtime.executor = FailingExecutor(job, fail_at, nan)
    return runtime


def final_phi(run_dir: Path) -> dict:
    return load_checkpoint(checkpoints(run_dir / "checkpoints")[-1])["phi"]


def test_a_crashed_run_resumed_from_the_cli_ends_with_the_same_phi(tmp_path, capsys):
    full = train(sinusoid_job(30), tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated crash"):
        job = sinusoid_job(30)
        train(job, tmp_path / "crashed", runtime=failing_runtime(job, tmp_path / "crashed", fail_at=24))
    assert [p.name for p in checkpoints(tmp_path / "crashed" / "checkpoints")] == ["step_00000010.pt", "step_00000020.pt"]
    assert main(["train", "--resume", str(tmp_path / "crashed")]) == 0
    assert "from step 20" in (tmp_path / "crashed" / "train.log").read_text()
    resumed = json.loads((tmp_path / "crashed" / "summary.json").read_text())
    for name, value in final_phi(tmp_path / "full").items():
        assert torch.equal(value, final_phi(tmp_path / "crashed")[name]), name
    assert resumed["test_mse"] == full["test_mse"] and resumed["steps"] == 30
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "crashed" / "metrics.csv"))]
    assert steps == [5, 10, 15, 20, 25, 30]  # rows logged after the checkpoint were recomputed, not duplicated


def test_resuming_a_finished_run_logs_no_row_twice(tmp_path):
    job = sinusoid_job(12, "train.log_every=5", "train.checkpoint_every=6")  # the last checkpoint holds steps 11-12
    train(job, tmp_path / "run")
    train(job, tmp_path / "run", resume=True)
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv"))]
    assert steps == [5, 10, 12]


def test_training_twice_is_deterministic(tmp_path):
    first, second = train(sinusoid_job(20), tmp_path / "a"), train(sinusoid_job(20), tmp_path / "b")
    assert first["test_mse"] == second["test_mse"]
    for name, value in final_phi(tmp_path / "a").items():
        assert torch.equal(value, final_phi(tmp_path / "b")[name])


def test_a_run_directory_is_never_overwritten_and_resume_keeps_the_math(tmp_path, capsys):
    train(sinusoid_job(10), tmp_path / "run")
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(sinusoid_job(10), tmp_path / "run")
    with pytest.raises(ValueError, match="algorithm.inner_lr changed"):
        train(sinusoid_job(20, "algorithm.inner_lr=0.5"), tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match="train.meta_batch changed"):  # the tasks of every step would change
        train(sinusoid_job(20, "train.meta_batch=3"), tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match="train.steps 5: its checkpoint is at step 10"):
        train(sinusoid_job(5), tmp_path / "run", resume=True)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 10  # refused: untouched
    assert main(["train", str(JOBS / "sinusoid_smoke.yaml"), "--resume", str(tmp_path / "run")]) == 2
    assert "give no job file" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "train.steps=20"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 20
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # a finished run's other files are still not overwritten
    with pytest.raises(FileExistsError, match=r"holds a finished run \(summary.json\) whose checkpoints are gone"):
        train(sinusoid_job(10), tmp_path / "run")


def test_a_run_that_failed_before_its_first_checkpoint_starts_over(tmp_path):
    """What a Ray Tune trial retry or a compare rerun does: resume if there is a checkpoint,
    else start again in the same folder."""
    job = sinusoid_job(20)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(job, tmp_path / "run", runtime=failing_runtime(job, tmp_path / "run", fail_at=7))
    assert (tmp_path / "run" / "metrics.csv").exists() and not checkpoints(tmp_path / "run" / "checkpoints")
    summary = train(job, tmp_path / "run", resume=bool(checkpoints(tmp_path / "run" / "checkpoints")))
    assert summary["steps"] == 20 and summary["phi_sha256"] == train(job, tmp_path / "fresh")["phi_sha256"]
    assert [int(r["step"]) for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv"))] == [5, 10, 15, 20]
    assert len(list((tmp_path / "run" / "tensorboard").iterdir())) == 1  # the failed attempt's events are gone


def test_resume_checks_the_job_against_the_checkpoint_not_config_json(tmp_path, capsys):
    train(sinusoid_job(10), tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["optimizer"]["lr"] *= 10  # an edit that would bypass the check of what may change
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "train.steps=20"]) == 1
    assert "optimizer.lr changed" in capsys.readouterr().err
    config["optimizer"]["lr"] /= 10
    config["data"]["cache"] = str(tmp_path / "elsewhere")  # where the data is may change (a moved run)
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "train.steps=20"]) == 0
    newest = checkpoints(tmp_path / "run" / "checkpoints")[-1]
    state = load_checkpoint(newest)
    del state["config"]  # as checkpoints from before it was kept: config.json is the job then
    torch.save(state, newest.path)
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "train.steps=25"]) == 0


def test_a_corrupt_newest_checkpoint_is_named_and_nothing_is_written(tmp_path, capsys):
    train(sinusoid_job(20), tmp_path / "run")
    newest = tmp_path / "run" / "checkpoints" / "step_00000020.pt"
    whole = newest.read_bytes()
    for cut in (1000, len(whole) // 2, len(whole) - 10):  # torch fails differently by where the file ends
        newest.write_bytes(whole[:cut])
        with pytest.raises(CorruptCheckpointError, match=f"checkpoint {newest} \\({cut} bytes\\) cannot be read"):
            load_checkpoint(newest)
    newest.write_bytes(whole[:1000])
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    for command in (["train", "--resume", str(tmp_path / "run"), "--set", "train.steps=30"],
                    ["eval", str(tmp_path / "run"), "--tasks", "4"]):
        assert main(command) == 1
        assert f"checkpoint {newest} (1000 bytes) cannot be read" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before
    newest.rename(tmp_path / "step_00000020.pt.broken")  # as the message says: resume from the one before
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "train.steps=30"]) == 0
    assert [int(r["step"]) for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv"))] == [5, 10, 15, 20, 25, 30]


def test_a_cut_last_metrics_row_is_dropped_and_a_malformed_earlier_one_named(tmp_path, caplog):
    train(sinusoid_job(20), tmp_path / "run")
    metrics = tmp_path / "run" / "metrics.csv"
    whole = metrics.read_text()
    metrics.write_text(whole + "25,3.1")  # a crash while row 25 was appended, after the checkpoint at 20
    train(sinusoid_job(30), tmp_path / "run", resume=True)
    assert "dropping its cut last row" in caplog.text
    assert [int(r["step"]) for r in csv.DictReader(open(metrics))] == [5, 10, 15, 20, 25, 30]
    assert metrics.read_text().startswith(whole)  # resumed at 20, not recomputed from the start
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([*lines[:2], lines[2].split(",")[0], *lines[3:]]) + "\n")  # row 10 lost its values
    with pytest.raises(ValueError, match=f"{metrics} line 3 is malformed"):
        train(sinusoid_job(40), tmp_path / "run", resume=True)


def test_a_folder_that_is_not_a_run_says_so(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 1
    assert f"{tmp_path} is not a run folder: it has no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{not json")
    assert main(["eval", str(tmp_path)]) == 2
    assert f"{tmp_path}/config.json: 1 problem(s)\n  - not valid JSON" in capsys.readouterr().err


def test_resuming_with_more_steps_under_a_decaying_schedule_is_refused(tmp_path):
    decaying = ("optimizer.schedule=linear",)
    train(sinusoid_job(10, *decaying), tmp_path / "run")
    with pytest.raises(ValueError, match="linear learning-rate schedule decays over train.steps"):
        train(sinusoid_job(20, *decaying), tmp_path / "run", resume=True)
    train(sinusoid_job(10, *decaying, "optimizer.schedule_steps=20"), tmp_path / "fixed")
    assert train(sinusoid_job(20, *decaying, "optimizer.schedule_steps=20"), tmp_path / "fixed", resume=True)["steps"] == 20


def test_ctrl_c_during_validation_leaves_a_checkpoint_that_resumes(tmp_path):
    job = sinusoid_job(10, "train.val_every=10", "train.val_tasks=4")
    runtime = LocalRuntime(job, Location(tmp_path / "run"), None, torch.device("cpu"))

    def interrupted():
        raise KeyboardInterrupt

    runtime.validate = interrupted  # Ctrl-C at the last step's validation, after its window was summed
    with pytest.raises(KeyboardInterrupt):
        train(job, tmp_path / "run", runtime=runtime)
    assert checkpoints(tmp_path / "run" / "checkpoints")[-1].name == "step_00000010.pt"
    assert train(job, tmp_path / "run", resume=True)["steps"] == 10  # the window is whole: its row is logged now
    last = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))[-1]
    assert last["step"] == "10" and last["val_mse"]


def test_non_finite_meta_gradient_stops_with_checkpoints_intact(tmp_path):
    job = sinusoid_job(30)
    with pytest.raises(NonFiniteError, match="non-finite meta-gradient at step 15 in layer1.weight"):
        train(job, tmp_path / "nan", runtime=failing_runtime(job, tmp_path / "nan", fail_at=15, nan=True))
    saved = checkpoints(tmp_path / "nan" / "checkpoints")
    assert [p.name for p in saved] == ["step_00000010.pt"]
    assert all(torch.isfinite(t).all() for t in load_checkpoint(saved[0])["phi"].values())


def test_a_diverging_evaluation_is_an_error_not_a_chance_score(tmp_path, capsys):
    train(sinusoid_job(10), tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["algorithm"]["inner_lr"] = 1e30  # what evaluation adapts with: it now diverges
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 1
    assert "test loss after 10 inner step(s) at rate 1e+30 is nan: adaptation diverges" in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("eval_*.json"))


def test_a_diverging_validation_is_logged_and_training_goes_on_to_its_checkpoint(tmp_path, caplog):
    job = sinusoid_job(40, "algorithm.inner_lr=0.3", "eval.inner_steps=50", "train.val_every=10",
                       "train.log_every=10", "train.checkpoint_every=20", "train.val_tasks=10")
    with pytest.raises(NonFiniteError, match="test loss after 50 inner step"):
        train(job, tmp_path / "run")
    assert "step 10: the validation loss is nan, adaptation diverges" in caplog.text
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [r["step"] for r in rows] == ["10", "20", "30", "40"]
    assert all(r[k] == "nan" for r in rows for k in r if k.startswith("val_"))  # no metric of it reads as a score
    assert checkpoint_step(checkpoints(tmp_path / "run" / "checkpoints")[-1]) == 40  # saved before the test

def test_time_limit_stops_training_and_still_reports(tmp_path):
    summary = train(sinusoid_job(100000, "train.time_limit_s=0.5"), tmp_path / "run")
    assert 1 <= summary["steps"] < 100000
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert int(rows[-1]["step"]) == summary["steps"]  # the last partial window is logged too
    assert (tmp_path / "run" / "learning_curve.png").exists()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(sinusoid_job(10), tmp_path / "empty", resume=True)


def test_sinusoid_maml_reduces_the_adapted_loss(tmp_path):
    summary = train(sinusoid_job(1500, "eval.tasks=200", "train.log_every=50"), tmp_path / "run")
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert float(rows[-1]["train_loss"]) < 0.5 * float(rows[0]["train_loss"])
    assert summary["test_mse"] < 1.5


@pytest.mark.slow
def test_sigterm_stops_a_ray_run_like_ctrl_c_with_a_checkpoint(tmp_path):
    """``ray job stop`` and schedulers send SIGTERM; Ray's driver handler would exit at once and
    lose every step since the last checkpoint (here: all of them)."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "distmeta.cli", "train", str(JOBS / "sinusoid_smoke.yaml"), "--workers", "1",
               "--out", str(out), "--set", "train.steps=100000", "--set", "train.log_every=10",
               "--set", "train.checkpoint_every=100000", "--set", "train.val_every=0"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.csv").exists() or len((out / "metrics.csv").read_text().splitlines()) < 3:
            assert process.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and "checkpoint written" in err
    step = load_checkpoint(checkpoints(out / "checkpoints")[-1])["step"]
    assert step >= 20
    assert main(["train", "--resume", str(out), "--set", f"train.steps={step + 5}", "--set", "runtime.workers=0"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 5

def test_the_command_restarts_itself_once_with_the_allocator_settings(monkeypatch):
    for key in ALLOCATOR_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(sys, "orig_argv", ["python3", "/venv/bin/distmeta", "eval", "runs/x"])
    restarts = []

    def execve(path, argv, env):
        restarts.append((path, argv, env))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", execve)
    with pytest.raises(SystemExit):
        cli.entry()
    path, argv, env = restarts[0]
    assert path == sys.executable and argv == [sys.executable, "/venv/bin/distmeta", "eval", "runs/x"]  # as started
    assert all(env[k] == v for k, v in ALLOCATOR_ENV.items())
    monkeypatch.setattr(cli, "main", lambda: 7)
    monkeypatch.setattr(os, "execve", lambda *args: (_ for _ in ()).throw(PermissionError("no exec here")))
    with pytest.raises(SystemExit) as finished:
        cli.entry()  # a process that cannot be restarted runs without the settings
    assert finished.value.code == 7
    for key in ALLOCATOR_ENV:  # set (by the restart, or by the user, whose values are kept): main runs here
        monkeypatch.setenv(key, "123")
    monkeypatch.setattr(os, "execve", execve)
    with pytest.raises(SystemExit) as finished:
        cli.entry()
    assert finished.value.code == 7 and len(restarts) == 1
