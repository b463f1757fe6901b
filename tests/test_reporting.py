"""Metrics files, confidence intervals and evaluation bookkeeping."""
from __future__ import annotations

import csv
import math

import pytest
import torch

from distmeta.algorithms import InnerLoop
from distmeta.data.sinusoid import SinusoidTasks
from distmeta.evaluate import evaluate, mean_ci95
from distmeta.metrics import MetricsLog, plot_learning_curve
from distmeta.models import make_mlp


def test_metrics_log_widens_its_header_and_truncates_on_resume(tmp_path):
    log = MetricsLog(tmp_path)
    log.write(1, {"train_loss": 2.0})
    log.write(2, {"train_loss": 1.5, "val_loss": 1.7})
    log.write(3, {"train_loss": 1.2})
    log.close()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["val_loss"] == "" and rows[1]["val_loss"] == "1.7"
    resumed = MetricsLog(tmp_path, resume_step=2)
    resumed.write(3, {"train_loss": 1.1})
    resumed.close()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [(r["step"], r["train_loss"]) for r in rows] == [("1", "2.0"), ("2", "1.5"), ("3", "1.1")]
    assert plot_learning_curve(tmp_path).stat().st_size > 10_000


def test_mean_ci95_is_the_normal_interval():
    values = torch.tensor([0.0, 1.0] * 50)
    mean, half = mean_ci95(values)
    assert mean == pytest.approx(0.5)
    assert half == pytest.approx(1.96 * values.double().std().item() / math.sqrt(100))


def test_evaluation_counts_every_task_once_whatever_the_batch(tmp_path):
    model = make_mlp(1, (8,), 1)
    phi = model.init(torch.Generator().manual_seed(0))
    sampler = SinusoidTasks(shots=5, queries=5)
    inner = InnerLoop(0.01, 2)
    whole = evaluate(model, phi, sampler, "test", 23, inner, batch=23)[2]
    chunked = evaluate(model, phi, sampler, "test", 23, inner, batch=5)[2]
    assert whole["tasks"] == chunked["tasks"] == 23
    assert chunked["mse"] == pytest.approx(whole["mse"], rel=1e-6)
    assert chunked["mse_ci95"] == pytest.approx(whole["mse_ci95"], rel=1e-5)
    fresh = evaluate(model, phi, sampler, "test", 23, inner, batch=5, round_index=1)[2]
    assert fresh["mse"] != whole["mse"]
