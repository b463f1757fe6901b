"""Meta-training on X→English language tasks end to end (real Tatoeba, tiny Transformer)."""
from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distmeta.cli import main
from distmeta.config import load_job
from distmeta.data.omniglot import DataError
from distmeta.evaluate import evaluate_run
from distmeta.train import train

REPO = Path(__file__).resolve().parents[1]
TATOEBA = REPO.parent / "shared" / "data" / "translation" / "tatoeba_x2en.parquet"
JOB = REPO / "jobs" / "translation_fomaml_smoke.yaml"


@pytest.fixture
def translation_env(monkeypatch, tmp_path_factory):
    if not TATOEBA.is_file():
        pytest.skip(f"real translation data not found at {TATOEBA}")
    monkeypatch.setenv("DISTMETA_TRANSLATION", str(TATOEBA))
    monkeypatch.setenv("DISTMETA_CACHE", str(tmp_path_factory.getbasetemp() / "translation-cache"))


@pytest.mark.slow
def test_fomaml_on_language_tasks_lowers_the_query_loss(translation_env, tmp_path):
    summary = train(load_job(JOB), tmp_path / "run")
    with open(tmp_path / "run" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    val = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    assert len(val) == 2 and val[1] < val[0] - 0.1
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]) - 0.3
    assert summary["test_tasks"] == 20 and 0.15 < summary["test_token_accuracy"] < 1


def test_translation_without_data_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("DISTMETA_TRANSLATION", raising=False)
    with pytest.raises(DataError, match=r"set data.translation \(a Parquet file\), data.parallel_text or \$DISTMETA_TRANSLATION"):
        train(load_job(JOB), tmp_path / "run")


def test_ray_workers_get_the_data_path_the_driver_was_given(translation_env, monkeypatch, tmp_path):
    """On a cluster, Ray's processes start before the submitting shell's environment is set:
    the data path must travel with the actors."""
    import ray

    monkeypatch.delenv("DISTMETA_TRANSLATION")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        monkeypatch.setenv("DISTMETA_TRANSLATION", str(TATOEBA))
        job = load_job(JOB, ["runtime.workers=1", "train.steps=2", "train.log_every=1", "train.val_every=0",
                             "train.checkpoint_every=2", "eval.tasks=2"])
        assert train(job, tmp_path / "run")["steps"] == 2
    finally:
        ray.shutdown()


def test_a_resume_may_find_the_data_elsewhere_but_not_other_data(translation_env, tmp_path):
    job = load_job(JOB, ["train.steps=2", "train.log_every=1", "train.val_every=0", "train.checkpoint_every=2",
                         "eval.tasks=2"])
    train(job, tmp_path / "run")
    moved = tmp_path / "moved.parquet"
    shutil.copyfile(TATOEBA, moved)  # the same bytes at another path: a run moved to another machine
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "train.steps=3",
                 "--set", f"data.translation={moved}"]) == 0
    pq.write_table(pq.read_table(TATOEBA).slice(1), tmp_path / "other.parquet")  # one pair fewer: other data
    with pytest.raises(ValueError, match="its data has changed .* not name other data"):
        train(replace(job, train=replace(job.train, steps=4), data=replace(job.data, translation=str(tmp_path / "other.parquet"))),
              tmp_path / "run", resume=True)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["data"]["translation"] = str(tmp_path / "other.parquet")  # eval is checked too
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="was trained on other data than its job now finds"):
        evaluate_run(tmp_path / "run", tasks=2)
