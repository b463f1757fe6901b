"""The MAML vs pre-training translation comparison: config validation, the equal-budget
baseline, fine-tuning and decoding, Ray Train pre-training against the in-process run, and
the whole pipeline's CPU smoke preset with its caching."""
from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml

from distmeta.checkpoint import checkpoints, load_checkpoint
from distmeta.cli import main
from distmeta.compare.config import DecodeConfig, FinetuneConfig, PretrainConfig, load_compare, pretrain_job
from distmeta.compare.finetune import finetune, finetune_on_dev, token_batches, translate
from distmeta.compare.pipeline import (
    compare,
    distinct_budgets,
    is_current,
    result_file,
    run_settings,
    runs,
    sentence_digests,
    stage_meta,
    training_tokens,
)
from distmeta.compare.pretrain import run_pretraining
from distmeta.compare.report import markdown, score_budget
from distmeta.components import build_model, transformer_size
from distmeta.config import ConfigError, load_job
from distmeta.data.omniglot import default_cache_dir
from distmeta.data.translation import TranslationTasks, open_store, prepare_translation
from distmeta.train import train

JOBS = Path(__file__).resolve().parents[1] / "jobs"
SMOKE = JOBS / "translation_compare_smoke.yaml"
DATA = os.environ.get("DISTMETA_TRANSLATION")
needs_data = pytest.mark.skipif(not DATA, reason="set DISTMETA_TRANSLATION to the Tatoeba Parquet file")


def write_compare(tmp_path: Path, **changes) -> Path:
    """The smoke comparison with top-level ``changes``, written to ``tmp_path``."""
    raw = {**yaml.safe_load(SMOKE.read_text()), "meta_job": str(JOBS / "translation_fomaml_smoke.yaml"), **changes}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"finetune": {"budgets": [0, -5]}}, "finetune.budgets: must be target-token counts >= 0 or 'all'"),
    ({"finetune": {"budgets": ["most"]}}, "finetune.budgets"),
    ({"targets": ["deu"]}, "targets: must not overlap sources"),
    ({"vocab_languages": ["deu", "fra", "spa", "ita"]}, "vocab_languages: must include every source and target"),
    ({"decode": {"beam": 0}}, "decode.beam: must be >= 1"),
    ({"pretrain": {"workers": 0}}, "pretrain.workers: must be >= 1"),
    ({"finetune": {"lr": 0.0}}, "finetune.lr: must be a rate or a list of rates, each finite and > 0"),
    ({"finetune": {"lr": [1e-3, -1.0]}}, "finetune.lr: must be a rate or a list of rates"),
    ({"fine_tune": {}}, "fine_tune: unknown key"),
    ({"meta_job": "nowhere.yaml"}, "meta_job: no job file"),
    ({"overrides": ["algorithm.name=pretrain"]}, "meta_job: algorithm.name is pretrain"),
    ({"overrides": ["model.heads=5"]}, "model.heads: must divide model.dim"),
])
def test_a_bad_comparison_names_its_key(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_compare(write_compare(tmp_path, **changes))


@pytest.mark.parametrize("job_text, message", [("- a list\n", "expected a job mapping, got list"),
                                               ("task: 5\n", "task: expected a mapping, got int")])
def test_a_meta_job_that_is_not_a_job_mapping_is_a_config_error(tmp_path, job_text, message):
    (tmp_path / "meta.yaml").write_text(job_text)
    with pytest.raises(ConfigError, match=message):
        load_compare(write_compare(tmp_path, meta_job="meta.yaml"))

def test_an_initialisation_that_translates_exactly_as_pre_training_is_not_significantly_different():
    refs = [f"sentence number {i} says something about {i % 7} cats" for i in range(60)]
    worse = [" ".join(r.split()[:-2]) for r in refs]
    scores = score_budget({"pretrain": worse, "maml": list(worse), "random": refs}, refs, bootstrap=200)
    assert scores["maml"]["bleu_p_vs_pretrain"] == scores["maml"]["chrf_p_vs_pretrain"] == 1.0
    assert scores["random"]["bleu_p_vs_pretrain"] < 0.01 and scores["random"]["bleu"] > scores["pretrain"]["bleu"]



def test_different_output_with_the_same_bleu_of_zero_is_not_significantly_different():
    """Each side gets BLEU 0 on every resample (no 4-gram in common with the references), so
    sacrebleu, counting resamples with a gap larger than the observed zero, gives its smallest p."""
    refs = [f"sentence number {i} says something about {i % 7} cats" for i in range(60)]
    scores = score_budget({"pretrain": ["I'mmmm."] * 60, "maml": ["Tom Tom"] * 60, "random": refs}, refs, bootstrap=200)
    assert scores["maml"]["bleu"] == scores["pretrain"]["bleu"] == 0.0
    assert scores["maml"]["bleu_p_vs_pretrain"] == 1.0
    assert scores["random"]["bleu_p_vs_pretrain"] < 0.01

def test_set_overrides_the_comparison_and_through_it_the_meta_job(tmp_path):
    spec, job = load_compare(SMOKE, ["targets=[lav]", "overrides=[algorithm.inner_optimizer=adam, algorithm.inner_lr=0.001]"])
    assert spec.targets == ["lav"] and (job.algorithm.inner_optimizer, job.algorithm.inner_lr) == ("adam", 0.001)
    assert "lav" in job.task.vocab_languages and "ron" not in job.task.vocab_languages
    with pytest.raises(ConfigError, match="algorithm.inner_optimizer: adam needs a first-order algorithm"):
        load_compare(SMOKE, ["overrides=[algorithm.name=maml, algorithm.inner_optimizer=adam]"])


def test_the_baseline_gets_the_same_updates_tasks_tokens_and_optimizer():
    spec, job = load_compare(SMOKE)
    base = pretrain_job(job, 17)
    assert job.task.languages == spec.sources and job.task.vocab_languages == [*spec.sources, *spec.targets]
    assert base.algorithm.name == "pretrain" and job.algorithm.name == "fomaml"
    assert (base.train.steps, base.train.meta_batch, base.optimizer) == (17, job.train.meta_batch, job.optimizer)
    assert base.train.time_limit_s is None  # it makes all the updates meta-training made
    assert base.task.query_tokens == job.task.support_tokens + job.task.query_tokens  # what fomaml sees per task
    assert base.task.languages == job.task.languages and base.seed == job.seed


@pytest.fixture(scope="module")
def target_tasks():
    """The smoke comparison's tokeniser and tasks over its two targets."""
    if not DATA:
        pytest.skip("set DISTMETA_TRANSLATION to the Tatoeba Parquet file")
    _, job = load_compare(SMOKE)
    pipeline, store = prepare_translation(DATA, job.task.vocab_languages, job.task.vocab, default_cache_dir())
    return job, pipeline, TranslationTasks(open_store(store), ["ron", "lav"], 300, 300, job.task.max_len, 0)


@needs_data
def test_budgets_are_nested_prefixes_of_one_order_and_hold_their_tokens(target_tasks):
    _, _, tasks = target_tasks
    small, large = tasks.budget_rows("ron", 2000, seed=0), tasks.budget_rows("ron", 8000, seed=0)
    assert np.array_equal(large[:len(small)], small)
    assert 1900 < tasks.target_tokens(small) <= 2000 and 7900 < tasks.target_tokens(large) <= 8000
    assert len(tasks.budget_rows("ron", None, seed=0)) == len(tasks.rows("ron", "train"))
    assert not np.array_equal(tasks.budget_rows("ron", 2000, seed=1)[:5], small[:5])  # another seed, other pairs
    assert all(tasks.target_tokens(b) <= 500 or len(b) == 1 for b in token_batches(tasks, large, 500))


@needs_data
def test_fine_tuning_on_one_pair_memorises_it_and_greedy_decoding_returns_it_exactly(target_tasks):
    job, pipeline, tasks = target_tasks
    torch.manual_seed(0)
    pair = tasks.rows("ron", "train")[:1]
    model = build_model(job)
    phi = model.init(torch.Generator().manual_seed(0))
    config = FinetuneConfig(lr=3e-3, batch_tokens=1000, max_steps=150, eval_every=25, patience=10)
    tuned = finetune(model, phi, tasks, pair, pair, config, seed=0, device=torch.device("cpu"))
    assert tuned.dev_loss < 0.05 < tuned.start_dev_loss and tuned.best_step > 0
    reference = pipeline.decode(tasks.batch(pair)[1][0, 1:].tolist())
    output = translate(tuned.phi, transformer_size(job), tasks, pipeline, pair, DecodeConfig(beam=1, max_len=32),
                       torch.device("cpu"))
    assert output == [reference]
    assert translate(tuned.phi, transformer_size(job), tasks, pipeline, pair, DecodeConfig(beam=3, max_len=32),
                     torch.device("cpu")) == [reference]


@needs_data
def test_no_budget_means_no_training_and_early_stopping_keeps_the_best_phi(target_tasks):
    job, _, tasks = target_tasks
    model = build_model(job)
    phi = model.init(torch.Generator().manual_seed(0))
    dev = tasks.rows("ron", "val")[:30]
    untouched = finetune(model, phi, tasks, tasks.rows("ron", "train")[:0], dev, FinetuneConfig(), 0, torch.device("cpu"))
    assert untouched.steps == 0 and all(torch.equal(untouched.phi[n], phi[n]) for n in phi)
    config = FinetuneConfig(lr=3e-2, batch_tokens=300, max_steps=60, eval_every=5, patience=2)  # too hot: diverges
    tuned = finetune(model, phi, tasks, tasks.budget_rows("ron", 3000, 0), dev, config, 0, torch.device("cpu"))
    assert tuned.dev_loss == min(loss for _, loss in tuned.curve)  # the Φ kept is the best one seen
    assert tuned.steps <= config.max_steps


@needs_data
def test_several_rates_keep_the_one_best_on_dev_and_a_diverging_one_is_only_ruled_out(target_tasks):
    job, _, tasks = target_tasks
    model = build_model(job)
    phi = model.init(torch.Generator().manual_seed(0))
    dev, train_rows = tasks.rows("ron", "val")[:30], tasks.budget_rows("ron", 2000, 0)
    config = FinetuneConfig(lr=[1e-3, 1e-6, 1e12], batch_tokens=500, max_steps=20, eval_every=10, patience=2)
    tuned, rate, losses = finetune_on_dev(model, phi, tasks, train_rows, dev, config, 0, torch.device("cpu"))
    assert rate == 1e-3 and losses[1e12] > losses[1e-3] < losses[1e-6] and tuned.dev_loss == losses[1e-3]
    untouched, rate, losses = finetune_on_dev(model, phi, tasks, train_rows[:0], dev, config, 0, torch.device("cpu"))
    assert untouched.steps == 0 and list(losses) == [1e-3]  # no budget: nothing to choose between


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@needs_data
@pytest.mark.slow
def test_ray_train_pretraining_matches_the_in_process_run_and_continues_where_it_stopped(local_ray, tmp_path):
    _, job = load_compare(SMOKE)
    job = pretrain_job(load_job(JOBS / "translation_fomaml_smoke.yaml", [
        "train.steps=6", "train.checkpoint_every=3", "train.val_every=0", "train.log_every=3", "eval.tasks=2",
        "runtime.workers=0", "runtime.path=loop", f"task.languages={json.dumps(job.task.languages)}",
        f"task.vocab_languages={json.dumps(job.task.vocab_languages)}"]), steps=6)
    train(job, tmp_path / "local")
    local = load_checkpoint(checkpoints(tmp_path / "local" / "checkpoints")[-1])["phi"]
    halfway = replace(job, train=replace(job.train, steps=3))
    interrupt = signal.getsignal(signal.SIGINT)
    run_pretraining(halfway, tmp_path / "ray_pretrain", PretrainConfig(workers=2))
    assert signal.getsignal(signal.SIGINT) is interrupt  # Ctrl-C still stops the stages after pre-training
    resumed = run_pretraining(job, tmp_path / "ray_pretrain", PretrainConfig(workers=2))  # continues from step 3
    straight = run_pretraining(job, tmp_path / "ray_straight", PretrainConfig(workers=2))
    for name, value in local.items():
        assert torch.equal(resumed[name], straight[name]), name  # stopping and continuing changes nothing
        # Two workers sum their halves of the meta-batch in another order than one process does:
        # fp32 rounding, which Adam's normalisation carries into Φ (1.3e-5 seen). Φ moves ~0.018
        # over these 6 steps of 3e-3, so a wrong step (other tasks, a lost update) is far above this.
        assert torch.allclose(straight[name], value, rtol=0, atol=1e-4), name


@needs_data
@pytest.mark.slow
def test_the_smoke_comparison_learns_reports_and_redoes_only_what_is_missing(tmp_path, caplog):
    folder = tmp_path / "cmp"
    with pytest.raises(FileNotFoundError, match="run --stage finetune first"):
        compare(SMOKE, folder, stage="report")
    assert main(["compare", str(SMOKE), "--out", str(folder)]) == 0
    report = json.loads((folder / "results.json").read_text())
    assert {(r["target"], r["budget"], r["init"]) for r in report["rows"]} == {
        (t, b, i) for t in ("ron", "lav") for b in ("0", "3000") for i in ("maml", "pretrain", "random")}
    for row in report["rows"]:
        if row["budget"] == "3000":  # fine-tuning beats its own starting point on dev chrF
            assert row["dev_chrf"] > row["start_dev_chrf"], row
            assert row["steps"] > 0 and 2500 < row["train_tokens"] <= 3000
        assert row["bleu_ci95"] is not None and 0 <= row["chrf"] <= 100 and row["budgets"] == [row["budget"]]
        assert (row["bleu_p_vs_pretrain"] is None) == (row["init"] == "pretrain")
    assert (folder / "learning_curves.png").stat().st_size > 10_000 and "p (MAML vs pre)" in (folder / "report.md").read_text()
    made = json.loads((folder / "meta" / "summary.json").read_text())["steps"]
    assert report["meta_updates"] == made and f"{made} updates of" in (folder / "report.md").read_text()

    spec, job = load_compare(SMOKE)
    files = {r: result_file(folder, *r) for r in runs(spec, training_tokens(job, spec.targets))}
    stamps = {r: f.stat().st_mtime_ns for r, f in files.items()}
    redo = ("lav", "maml", 3000, 0)
    files[redo].unlink()
    caplog.set_level("INFO", logger="distmeta.compare")
    compare(SMOKE, folder)  # meta-training and pre-training are not redone, one fine-tuning run is
    assert "meta-training already finished" in caplog.text and "pre-training already finished" in caplog.text
    assert "12 fine-tuning runs, 11 already done" in caplog.text
    assert all(files[r].stat().st_mtime_ns == stamps[r] for r in files if r != redo) and files[redo].exists()
    wider, _ = load_compare(SMOKE, ["finetune.seeds=[0, 1]", "finetune.budgets=[0, 3000, 6000]"])
    assert all(is_current(f, run_settings(wider)) for f in files.values())  # more seeds/budgets keep these
    sentences = {t: sentence_digests(spec, job, t) for t in spec.targets}
    assert all(is_current(f, run_settings(spec), sentences[r[0]]) for r, f in files.items())
    result = json.loads(files[redo].read_text())
    files[redo].write_text(json.dumps({**result, "sentences_sha256": {**result["sentences_sha256"], "test": "0" * 64}}))
    with pytest.raises(FileNotFoundError, match="or for other dev/test sentences"):  # never scored against other refs
        compare(SMOKE, folder, stage="report")
    files[redo].write_text(json.dumps(result))

    changed = write_compare(tmp_path, finetune={**yaml.safe_load(SMOKE.read_text())["finetune"], "lr": 0.002})
    with pytest.raises(FileNotFoundError, match="made under other finetune/decode settings"):
        compare(changed, folder, stage="report")  # results of the old settings are never reported as the new


def test_the_report_states_the_updates_made_not_the_configured_ones():
    spec, job = load_compare(SMOKE, ["overrides=[train.steps=5000, train.time_limit_s=80]"])
    text = markdown(spec, job, [], updates=74)
    assert "74 updates of" in text and "5000" not in text



def test_the_report_says_the_fine_tuning_rate_was_chosen_only_when_there_was_a_choice():
    one, job = load_compare(SMOKE, ["finetune.lr=0.0001"])
    two, _ = load_compare(SMOKE, ["finetune.lr=[0.0001, 0.0005]"])
    assert "Adam at 0.0001, batches" in markdown(one, job, [], updates=5)
    assert "Adam at 0.0001 or 0.0005 (chosen on dev loss per run), batches" in markdown(two, job, [], updates=5)

def test_budgets_that_hold_all_of_a_target_s_pairs_are_one_run():
    spec, _ = load_compare(SMOKE, ["finetune.budgets=[all, 0, 4000, 16000, 64000]", "finetune.seeds=[0, 1]"])
    tokens = {"ron": 55_852, "lav": 9_548}
    assert distinct_budgets(spec, tokens)["ron"] == {64000: [None, 64000], 0: [0], 4000: [4000], 16000: [16000]}
    assert distinct_budgets(spec, tokens)["lav"] == {16000: [None, 16000, 64000], 0: [0], 4000: [4000]}
    assert len(runs(spec, tokens)) == 3 * (7 + 5)  # (budget 0 once + 3 or 2 budgets x 2 seeds) x 3 inits
    exact, _ = load_compare(SMOKE, ["finetune.budgets=[9548, all]"])
    assert distinct_budgets(exact, tokens)["lav"] == {9548: [9548, None]}  # the budget that is exactly all of it


@needs_data
def test_meta_training_interrupted_in_a_folder_that_moved_resumes_where_its_data_now_is(tmp_path):
    spec, job = load_compare(SMOKE, ["overrides=[runtime.workers=0, train.steps=4, train.checkpoint_every=2, "
                                     "train.log_every=2, train.val_every=0, eval.tasks=4]"])
    elsewhere = replace(job, data=replace(job.data, translation=str(tmp_path / "was" / "pairs.parquet")),
                        train=replace(job.train, steps=2))
    (tmp_path / "was").mkdir()
    os.symlink(DATA, tmp_path / "was" / "pairs.parquet")
    train(elsewhere, tmp_path / "meta")  # as if stopped at step 2 on the machine the folder came from
    (tmp_path / "meta" / "summary.json").unlink()
    (tmp_path / "was" / "pairs.parquet").unlink()
    stage_meta(spec, job, tmp_path)
    assert json.loads((tmp_path / "meta" / "summary.json").read_text())["steps"] == 4


@needs_data
def test_a_run_folder_of_another_meta_training_job_or_data_is_refused_but_may_move(tmp_path):
    compare(SMOKE, tmp_path, stage="prepare")
    recorded = json.loads((tmp_path / "compare.json").read_text())

    def record(edit) -> None:
        changed = json.loads(json.dumps(recorded))
        edit(changed)
        (tmp_path / "compare.json").write_text(json.dumps(changed))

    record(lambda r: r["meta_job"]["algorithm"].update(inner_lr=0.5))
    with pytest.raises(ValueError, match=r"another meta-training job or data \(algorithm.inner_lr changed\)"):
        compare(SMOKE, tmp_path, stage="prepare")
    record(lambda r: r.update(data_sha256="0" * 64))  # the same path, but other content
    with pytest.raises(ValueError, match="the translation data's content"):
        compare(SMOKE, tmp_path, stage="prepare")
    record(lambda r: (r.pop("data_sha256"), r["meta_job"]["data"].update(translation="/gone/pairs.parquet")))
    with pytest.raises(ValueError, match="recorded without a digest of its data, whose file is gone"):
        compare(SMOKE, tmp_path, stage="prepare")
    # the folder made elsewhere (data and cache at other paths, other resources) by a distmeta
    # from before runtime.scale_up_timeout_s existed
    record(lambda r: (r["meta_job"]["data"].update(translation="/elsewhere/pairs.parquet", cache="/elsewhere/cache"),
                      r["meta_job"]["runtime"].update(workers=7, threads=3),
                      r["meta_job"]["runtime"].pop("scale_up_timeout_s")))
    compare(SMOKE, tmp_path, stage="prepare")
