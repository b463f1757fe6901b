"""`distmeta toy` reproduces the qualitative gap of Finn et al. (2017) between MAML and pre-training."""
from __future__ import annotations

import json

import pytest

from distmeta.cli import main


@pytest.mark.slow
def test_toy_shows_the_maml_vs_pretraining_gap(tmp_path, capsys):
    assert main(["toy", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for method in ("maml", "pretrain"):
        assert set(summary[method]["mse"]) >= {"1", "5", "10"}
    assert summary["maml"]["mse"]["10"] < 0.6, summary
    assert summary["pretrain"]["mse"]["10"] > 1.5, summary
    for steps in ("1", "5", "10"):
        assert summary["maml"]["mse"][steps] < summary["pretrain"]["mse"][steps]
    assert (tmp_path / "sinusoid.png").stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "maml" in table and "pretrain" in table and "0 step(s)" in table and "10 step(s)" in table
