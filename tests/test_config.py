"""Job files: every shipped one validates; bad ones fail at load naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from distmeta.cli import main
from distmeta.compare.config import is_compare_file, load_compare
from distmeta.config import ConfigError, job_from_dict, load_job, read_config_file
from distmeta.sweep import is_sweep_file, load_sweep

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_shipped_job_sweep_and_comparison_file_validates(path):
    spec = load_sweep(path)[0] if is_sweep_file(path) else load_compare(path)[0] if is_compare_file(path) else load_job(path)
    assert spec.name == path.stem
    assert path.read_text().startswith("#"), "job files open with a comment giving the launch command"


def test_the_paper_settings_are_in_the_paper_jobs():
    job = load_job(Path(JOBS[0]).parent / "omniglot_5w1s.yaml")
    assert (job.algorithm.inner_lr, job.algorithm.inner_steps, job.train.meta_batch, job.optimizer.lr) == (0.4, 1, 32, 1e-3)
    job = load_job(Path(JOBS[0]).parent / "omniglot_20w1s.yaml")
    assert (job.task.ways, job.algorithm.inner_lr, job.algorithm.inner_steps, job.train.meta_batch) == (20, 0.1, 5, 16)


@pytest.mark.parametrize("raw, key, text", [
    ({"task": {"wayz": 5}}, "task.wayz", "unknown key; allowed keys: dataset, ways"),
    ({"task": {"ways": "five"}}, "task.ways", "expected int"),
    ({"algorithm": {"name": "maml2"}}, "algorithm.name", "choose one of maml, fomaml, reptile, pretrain"),
    ({"task": {"shots": 5, "queries": 16}}, "task.queries", "exceeds the 20 drawings"),
    ({"task": {"ways": 2000}}, "task.ways", "smallest vinyals split has 400 classes"),
    ({"optimizer": {"lr": -1}}, "optimizer.lr", "must be finite and > 0"),
    ({"optimizer": {"lr": float("inf")}}, "optimizer.lr", "must be finite and > 0"),
    ({"optimizer": {"schedule": "exponential"}}, "optimizer.schedule", "choose one of constant, linear, cosine"),
    ({"algorithm": {"inner_optimizer": "adam"}}, "algorithm.inner_optimizer", "needs a first-order algorithm"),
    ({"algorithm": {"name": "reptile", "adapt": ["head.*"]}}, "algorithm.adapt", "would never train"),
    ({"runtime": {"path": "vmap", "precision": "bf16"}}, "runtime.precision", "under vmap the convolutions"),
    ({"optimizer": {"schedule_steps": 0}}, "optimizer.schedule_steps", "must be >= 1"),
    ({"train": {"log_every": 20, "val_every": 50}}, "train.val_every", "multiple of train.log_every"),
    ({"train": {"val_tasks": 1}}, "train.val_tasks", "must be >= 2"),
    ({"train": {"log_every": 0}}, "train.log_every", "must be >= 1"),
    ({"train": {"steps": True}}, "train.steps", "expected int"),
    ({"task": {"rotations": [0, 45]}}, "task.rotations", "0, 90, 180, 270"),
    ({"runtime": {"scale_up_timeout_s": -1}}, "runtime.scale_up_timeout_s", "must be >= 0 and finite"),
    ({"runtime": {"path": "gpu"}}, "runtime.path", "choose one of auto, batched, vmap, loop"),
    ({"runtime": {"device": "cuda", "workers": 2}}, "runtime.device", "needs runtime.worker_gpus > 0"),
    ({"task": {"dataset": "sinusoid"}}, "model.name", "sinusoid tasks need model mlp"),
    ({"model": {"width": 0}}, "model.width", "must be >= 1"),
    ({"task": {"dataset": "sinusoid"}, "model": {"name": "mlp", "hidden": [40, 0]}}, "model.hidden", "each >= 1"),
    ({"eval": 3}, "eval", "expected a mapping"),
    ({"seed": 10**20}, "seed", "< 2**63"),
    ({"task": {"protocol": "alphabet", "val_characters": 964}}, "task.val_characters", "must be < 964"),
])
def test_bad_values_name_the_key(raw, key, text):
    with pytest.raises(ConfigError) as error:
        job_from_dict(raw)
    assert f"{key}: " in str(error.value) and text in str(error.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as error:
        job_from_dict({"task": {"wayz": 1, "shots": "x"}, "model": {"name": "vit"}})
    assert len(error.value.problems) == 3


def test_overrides_apply_and_are_validated(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: x\ntrain: {steps: 10}\n")
    job = load_job(path, ["train.steps=20", "algorithm.inner_lr=0.1", "task.rotations=[0]"])
    assert (job.train.steps, job.algorithm.inner_lr, job.task.rotations) == (20, 0.1, [0])
    with pytest.raises(ConfigError, match="train.steps: must be >= 1"):
        load_job(path, ["train.steps=0"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_job(path, ["train.steps"])
    with pytest.raises(ConfigError, match=r"--set train.steps: '\[1' is not a YAML value"):
        load_job(path, ["train.steps=[1"])


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("task: {ways: 1}\n")
    assert main(["validate", str(path)]) == 2
    assert "task.ways: must be >= 2" in capsys.readouterr().err
    path.write_text("task: [unclosed\n")
    assert main(["validate", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    path.write_text("train: {steps: 5}\nmodel: {name: conv4}\ntrain: {meta_batch: 2}\n")  # PyYAML keeps the last
    assert main(["validate", str(path)]) == 2
    assert "key 'train' is given twice" in capsys.readouterr().err
    path.write_text("# only a comment\n")
    assert main(["validate", str(path)]) == 2
    assert "the file is empty" in capsys.readouterr().err
    path.write_bytes(b"name: \xff\n")
    assert main(["validate", str(path)]) == 2
    assert f"{path}: 1 problem(s)\n  - not UTF-8 text" in capsys.readouterr().err


def test_yaml_merge_keys_still_work_beside_the_duplicate_key_check(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("base: &base {steps: 10, meta_batch: 4}\ntrain: {<<: *base, steps: 20}\n")
    assert read_config_file(path)["train"] == {"steps": 20, "meta_batch": 4}  # own keys override merged ones


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("optimizer: {lr: 1e-3}\nalgorithm: {inner_lr: 4E-1}\n")
    job = load_job(path)
    assert job.optimizer.lr == 0.001 and job.algorithm.inner_lr == 0.4
