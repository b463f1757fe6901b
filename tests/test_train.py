"""End to end: the CLI trains, checkpoints, evaluates, resumes and refuses NaNs."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from distmeta.checkpoint import checkpoints, load_checkpoint
from distmeta.cli import main
from distmeta.config import load_job
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
                                                    "eval.tasks=20", "train.val_every=0", *overrides])


def test_training_is_deterministic_and_resume_gives_the_same_phi(tmp_path):
    full = train(sinusoid_job(30), tmp_path / "full")
    train(sinusoid_job(20), tmp_path / "resumed")
    resumed = train(sinusoid_job(30), tmp_path / "resumed", resume=True)
    again = train(sinusoid_job(30), tmp_path / "again")
    phis = [load_checkpoint(checkpoints(tmp_path / d / "checkpoints")[-1])["phi"] for d in ("full", "resumed", "again")]
    for name in phis[0]:
        assert torch.equal(phis[0][name], phis[1][name]), name
        assert torch.equal(phis[0][name], phis[2][name]), name
    assert full["test_mse"] == resumed["test_mse"] == again["test_mse"]
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "resumed" / "metrics.csv"))]
    assert steps == sorted(steps) and steps[-1] == 30


def test_non_finite_meta_gradient_stops_with_checkpoints_intact(tmp_path):
    job = sinusoid_job(30, "algorithm.inner_lr=1e30")
    with pytest.raises(NonFiniteError, match="non-finite meta-gradient at step 0"):
        train(job, tmp_path / "nan")
    for path in checkpoints(tmp_path / "nan" / "checkpoints"):
        assert all(torch.isfinite(t).all() for t in load_checkpoint(path)["phi"].values())


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(sinusoid_job(10), tmp_path / "empty", resume=True)


def test_sinusoid_maml_reduces_the_adapted_loss(tmp_path):
    summary = train(sinusoid_job(1500, "eval.tasks=200"), tmp_path / "run")
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert float(rows[-1]["train_loss"]) < 0.5 * float(rows[0]["train_loss"])
    assert summary["test_mse"] < 1.5
