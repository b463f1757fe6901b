"""Run locations: local folders and pyarrow.fs URIs, and runs kept on a remote filesystem."""
from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import pytest

from distmeta.checkpoint import checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from distmeta.cli import main
from distmeta.config import load_job
from distmeta.storage import Location
from distmeta.train import train

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def test_a_file_uri_and_a_plain_path_name_the_same_place(tmp_path):
    by_uri, by_path = Location(f"file://{tmp_path}") / "run", Location(tmp_path / "run")
    (by_uri / "a.txt").write_bytes(b"hello")
    assert (by_path / "a.txt").read_bytes() == b"hello" and by_path.listdir() == ["a.txt"]
    assert by_uri.uri == f"file://{tmp_path}/run" and by_path.uri == f"{tmp_path}/run"
    assert by_uri.local == Path(tmp_path / "run") and (by_uri / "a.txt").name == "a.txt"


def test_checkpoints_are_written_whole_and_pruned(tmp_path):
    directory = Location(f"file://{tmp_path}/checkpoints")
    for step in (5, 10, 15):
        save_checkpoint(directory, step, {"value": step}, keep=2)
    assert [c.name for c in checkpoints(directory)] == ["step_00000010.pt", "step_00000015.pt"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000010.pt", "step_00000015.pt"]
    assert load_checkpoint(latest_checkpoint(directory))["value"] == 15


@pytest.mark.parametrize("fail_at", ["write", "move"])
def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path, fail_at):
    """A crash (full disk, Ctrl-C) while a checkpoint or metrics.csv is rewritten must not
    leave the reader a truncated file."""
    target = Location(tmp_path) / "metrics.csv"
    target.write_bytes(b"step,loss\n1,0.5\n")

    class Interrupted(Exception):
        pass

    class FailingFilesystem:
        """The real filesystem, but the write stops halfway or the rename fails."""
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        def open_output_stream(self, path):
            stream = self.real.open_output_stream(path)
            if fail_at == "write":
                class HalfWritten:
                    def __enter__(self):
                        return self

                    def __exit__(self, *exc):
                        stream.close()

                    def write(self, data):
                        stream.write(data[: len(data) // 2])
                        raise Interrupted()
                return HalfWritten()
            return stream

        def move(self, source, destination):
            if fail_at == "move":
                raise Interrupted()
            self.real.move(source, destination)

    target.fs = FailingFilesystem(target.fs)
    with pytest.raises(Interrupted):
        target.write_bytes(b"step,loss\n1,0.5\n2,0.4\n" * 1000)
    assert Location(tmp_path / "metrics.csv").read_bytes() == b"step,loss\n1,0.5\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]

def test_an_unwritable_location_says_where(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match=f"storage {tmp_path}/file/run is not writable"):
        Location(tmp_path / "file" / "run").check_writable()


@pytest.fixture
def remote(monkeypatch, tmp_path):
    """Treat every location as remote (what an s3:// run is): the driver then stages its
    metrics locally and copies them over, and resumes by copying them back."""
    monkeypatch.setattr(Location, "local", property(lambda self: None))
    (tmp_path / "staging").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "staging"))
    return f"file://{tmp_path}/bucket/run"


def test_a_run_on_a_remote_location_keeps_metrics_checkpoints_and_resumes(remote, tmp_path):
    job = load_job(JOBS / "sinusoid_smoke.yaml", ["train.steps=20", "train.log_every=5", "train.checkpoint_every=10",
                                                  "train.val_every=0", "eval.tasks=10"])
    train(job, remote)
    bucket = tmp_path / "bucket" / "run"
    assert {"config.json", "metrics.csv", "summary.json", "train.log", "learning_curve.png"} <= {
        p.name for p in bucket.iterdir()}
    assert (bucket / "tensorboard").is_dir() and (tmp_path / "staging" / "distmeta-runs").is_dir()
    assert main(["train", "--resume", remote, "--set", "train.steps=30"]) == 0
    rows = list(csv.DictReader(io.StringIO((bucket / "metrics.csv").read_text())))
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20, 25, 30]  # the earlier rows came back from the bucket
    assert json.loads((bucket / "summary.json").read_text())["steps"] == 30
    assert [c.name for c in checkpoints(f"{remote}/checkpoints")][-1] == "step_00000030.pt"
