"""``distmeta compare``: MAML vs multilingual pre-training as initialisations for
low-resource translation (Gu et al. 2018), as cached, resumable stages on one Ray instance.

    prepare   the shared tokeniser and encoded store (cached by data file, languages, size)
    meta      meta-training on the sources: a ``train`` run on the parameter-server runtime
    pretrain  the equal-budget multilingual baseline on Ray Train
    finetune  every (target, budget, seed, initialisation) fine-tuned, then its dev and test
              sentences translated: one Ray task each, in parallel, each result one file;
              budgets that hold all of a target's pairs are one run
    report    sacrebleu BLEU / chrF with 95% CIs and paired bootstrap, report.md,
              results.json and the learning-curve PNG

Each stage skips the work whose result is already on disk, so a crash redoes only what is
missing; ``--stage`` runs one stage (after checking that its inputs exist). The run folder
records the configuration; a stage refuses to reuse results made under a different one. A
new target changes the default tokeniser (trained on sources and targets), so a folder that
is to take more targets later names them in ``vocab_languages`` from the start.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from distmeta.checkpoint import checkpoints, latest_checkpoint, load_checkpoint
from distmeta.compare.config import INITS, CompareConfig, budget_name, load_compare, pretrain_job
from distmeta.components import build_model, data_cache, transformer_size, translation_source
from distmeta.config import RESOURCE_KEYS, ConfigError, JobConfig, changed_keys, job_from_dict, job_to_dict
from distmeta.data.translation import (
    DataError,
    TranslationTasks,
    open_store,
    prepare_translation,
    read_source,
    source_digest,
)
from distmeta.storage import Location

log = logging.getLogger("distmeta.compare")
STAGES = ("prepare", "meta", "pretrain", "finetune", "report")


def compare(path: str | Path, out: str | Path | None = None, stage: str = "all", address: str | None = None,
            overrides: list[str] = ()) -> Path:
    """Run the comparison ``path`` (every stage, or one; ``key=value`` ``overrides`` of the
    comparison's keys) into ``out``; returns the run folder.

    Raises:
        ConfigError: a malformed comparison or meta-training job.
        DataError: missing or unreadable translation data, or a language it lacks.
        ValueError: an unknown stage; results in ``out`` made under another configuration.
        FileNotFoundError: a stage run on its own before the stages it needs.
    """
    if stage != "all" and stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of all, {', '.join(STAGES)}")
    spec, job = load_compare(path, overrides)
    job = _resolved_data(job)
    folder = Path(out) if out is not None else Path("runs") / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    _record_config(folder, spec, job)
    from distmeta.runtime.ray_runtime import RaySession

    wanted = STAGES if stage == "all" else (stage,)
    with RaySession(address or job.runtime.address, log_to_driver=True, dashboard=None):
        for name in wanted:
            began = time.perf_counter()
            log.info("compare: stage %s", name)
            STAGE_FUNCTIONS[name](spec, job, folder)
            log.info("compare: stage %s done in %.0f s", name, time.perf_counter() - began)
    return folder


def _resolved_data(job: JobConfig) -> JobConfig:
    """The job with its data files and cache folder as absolute paths, so that Ray workers
    read the same files wherever their environment points."""
    source = translation_source(job)
    cache = str(data_cache(job).absolute())
    if isinstance(source, str):
        return replace(job, data=replace(job.data, translation=str(Path(source).absolute()), cache=cache))
    files = [{**entry, "src": str(Path(entry["src"]).absolute()), "tgt": str(Path(entry["tgt"]).absolute())}
             for entry in job.data.parallel_text]
    return replace(job, data=replace(job.data, parallel_text=files, cache=cache))


def _record_config(folder: Path, spec: CompareConfig, job: JobConfig) -> None:
    """Write compare.json, after checking that a comparison already there had the same
    meta-training job (the initialisations) on the same data; fine-tuning results carry their
    own settings. The data is compared by content, not by path, and where the job runs (the
    runtime's resources) does not count, so a folder moves between machines."""
    record = {"compare": asdict(spec), "meta_job": job_to_dict(job), "data_sha256": source_digest(translation_source(job))}
    recorded = folder / "compare.json"
    if recorded.exists():
        differences = _differences(json.loads(recorded.read_text()), record)
        if differences:
            raise ValueError(f"{folder} holds a comparison made with another meta-training job or data "
                             f"({'; '.join(differences)}); use another --out for this one")
    recorded.write_text(json.dumps(record, indent=2))


def _differences(recorded: dict, record: dict) -> list[str]:
    """What differs between a recorded comparison and this one, as far as its results go."""
    try:  # read as a job now, so keys added to distmeta since take their defaults
        before = job_from_dict(recorded.get("meta_job") or {}, "recorded meta job")
    except ConfigError as error:
        return [str(error)]
    digest = recorded.get("data_sha256")
    if digest is None:  # recorded before digests were: the data its job names, if still there
        try:
            digest = source_digest(translation_source(before))
        except DataError:
            return ["recorded without a digest of its data, whose file is gone"]
    changed = changed_keys(before, job_from_dict(record["meta_job"]), ignore=(*RESOURCE_KEYS, "data.*"))
    return ([] if digest == record["data_sha256"] else ["the translation data's content"]) + \
        ([f"{', '.join(changed)} changed"] if changed else [])


def _data(job: JobConfig, languages: list[str]) -> tuple[Any, TranslationTasks]:
    """The shared tokeniser and tasks over ``languages`` (from the cached store)."""
    t = job.task
    pipeline, store = prepare_translation(translation_source(job), t.vocab_languages, t.vocab, data_cache(job))
    return pipeline, TranslationTasks(open_store(store), languages, t.support_tokens, t.query_tokens, t.max_len, job.seed)


def stage_prepare(spec: CompareConfig, job: JobConfig, folder: Path) -> None:
    """Tokeniser and store; fails here on a language the data lacks."""
    pipeline, _ = _data(job, [*spec.sources, *spec.targets])
    log.info("compare: vocabulary of %d pieces trained on the training pairs of %s", pipeline.vocab_size,
             ", ".join(job.task.vocab_languages))


def stage_meta(spec: CompareConfig, job: JobConfig, folder: Path) -> None:
    from distmeta.train import train

    run = folder / "meta"
    if (run / "summary.json").exists():
        log.info("compare: meta-training already finished in %s", run)
        return
    resume = bool(checkpoints(run / "checkpoints"))
    if resume:  # the folder may have moved: its data (the same content, checked) and cache are where this job says
        config = Location(run / "config.json")
        config.write_bytes(json.dumps({**json.loads(config.read_bytes()), "data": job_to_dict(job)["data"]}, indent=2).encode())
    train(job, run, resume=resume)


def stage_pretrain(spec: CompareConfig, job: JobConfig, folder: Path) -> None:
    from distmeta.compare.pretrain import run_pretraining

    done = folder / "pretrain" / "phi.pt"
    if done.exists():
        log.info("compare: pre-training already finished (%s)", done)
        return
    if not (folder / "meta" / "summary.json").exists():
        raise FileNotFoundError(f"no finished meta-training in {folder / 'meta'} (pre-training matches its number "
                                "of updates); run --stage meta first")
    phi = run_pretraining(pretrain_job(job, meta_updates(folder)), folder / "pretrain", spec.pretrain)
    torch.save(phi, done.with_suffix(".tmp"))
    done.with_suffix(".tmp").replace(done)


def meta_updates(folder: Path) -> int:
    """The updates meta-training made (a time limit may stop it before ``train.steps``)."""
    return json.loads((folder / "meta" / "summary.json").read_text())["steps"]


def initialisation(name: str, job: JobConfig, folder: Path) -> dict[str, torch.Tensor]:
    """Φ of an initialisation: MAML's final Φ, pre-training's, or the shared random start.

    Raises:
        FileNotFoundError: its stage has not run yet.
    """
    if name == "maml":
        if not (folder / "meta" / "summary.json").exists():
            raise FileNotFoundError(f"no finished meta-training in {folder / 'meta'}; run --stage meta first")
        return load_checkpoint(latest_checkpoint(folder / "meta" / "checkpoints"))["phi"]
    if name == "pretrain":
        if not (folder / "pretrain" / "phi.pt").exists():
            raise FileNotFoundError(f"no finished pre-training in {folder / 'pretrain'}; run --stage pretrain first")
        return torch.load(folder / "pretrain" / "phi.pt", weights_only=True)
    from distmeta.runtime.local import initial_phi

    return initial_phi(job, build_model(job))


def result_file(folder: Path, target: str, init: str, budget: int | None, seed: int) -> Path:
    return folder / "finetune" / target / init / f"{budget_name(budget)}_seed{seed}.json"


def run_settings(spec: CompareConfig) -> dict[str, Any]:
    """What a fine-tuning result depends on besides its run key and the initialisations
    (which the recorded meta job guards), recorded with it: a result made under other settings
    is redone."""
    return {"finetune": asdict(spec.finetune), "decode": asdict(spec.decode)}


def is_current(path: Path, settings: dict[str, Any], sentences: dict[str, str] | None = None) -> bool:
    """Whether ``path`` holds a result made under ``settings`` and, where it recorded them,
    for the dev and test ``sentences`` (``sentence_digests``) read now. The lists of budgets
    and seeds do not count (each run's key holds its own), so adding a budget or a seed runs
    only the new runs."""
    if not path.exists():
        return False
    result = json.loads(path.read_text())
    recorded = result.get("sentences_sha256")
    return (_without_run_lists(result.get("settings")) == _without_run_lists(settings)
            and (recorded is None or sentences is None or recorded == sentences))


def sentence_digests(spec: CompareConfig, job: JobConfig, target: str) -> dict[str, str]:
    """sha256 of the dev and test pairs a target's results decode and are scored against: a
    result from other sentences (the data, or how it is read, changed) is redone, never
    scored against references it was not decoded for."""
    return _digests(_scored_pairs(spec, job, target))


def _scored_pairs(spec: CompareConfig, job: JobConfig, target: str) -> dict[str, tuple[list[str], list[str]]]:
    """``references`` of a target's dev and test splits, by split."""
    return {split: references(job, target, split, count)
            for split, count in (("dev", spec.decode.dev_pairs), ("test", spec.decode.test_pairs))}


def _digests(pairs: dict[str, tuple[list[str], list[str]]]) -> dict[str, str]:
    return {split: hashlib.sha256("\n".join([*sources, "\0", *targets]).encode()).hexdigest()
            for split, (sources, targets) in pairs.items()}


def _without_run_lists(settings: dict[str, Any] | None) -> dict[str, Any] | None:
    if settings is None:
        return None
    return {**settings, "finetune": {k: v for k, v in settings["finetune"].items() if k not in ("budgets", "seeds")}}


def training_tokens(job: JobConfig, targets: list[str]) -> dict[str, int]:
    """Each target's training tokens (what a budget of "all" trains on)."""
    _, tasks = _data(job, targets)
    return {target: tasks.target_tokens(tasks.rows(target, "train")) for target in targets}


def distinct_budgets(spec: CompareConfig, tokens: dict[str, int]) -> dict[str, dict[int | None, list[int | None]]]:
    """Per target, each budget that is run → the requested budgets its result stands for.

    Budgets are prefixes of one order of a target's pairs, so every budget at or above its
    training tokens trains on all of them: only the smallest of those runs.
    """
    out: dict[str, dict[int | None, list[int | None]]] = {}
    for target in spec.targets:
        covering = [b for b in spec.budget_tokens() if b is None or b >= tokens[target]]
        smallest = min(covering, key=lambda b: math.inf if b is None else b, default=None)
        out[target] = {}
        for budget in spec.budget_tokens():
            out[target].setdefault(smallest if budget in covering else budget, []).append(budget)
    return out


def runs(spec: CompareConfig, tokens: dict[str, int]) -> list[tuple[str, str, int | None, int]]:
    """Every distinct (target, init, budget, seed) fine-tuning run, given each target's
    training ``tokens``; budget 0 (no training) once, seed-free."""
    return [(target, init, budget, seed) for target, budgets in distinct_budgets(spec, tokens).items()
            for budget in budgets for seed in (spec.finetune.seeds[:1] if budget == 0 else spec.finetune.seeds)
            for init in INITS]


def stage_finetune(spec: CompareConfig, job: JobConfig, folder: Path) -> None:
    import ray

    inits = {name: ray.put(initialisation(name, job, folder)) for name in INITS}
    remote = ray.remote(num_cpus=spec.finetune.cpus, num_gpus=spec.finetune.gpus, max_retries=2)(finetune_run)
    every = runs(spec, training_tokens(job, spec.targets))
    sentences = {target: sentence_digests(spec, job, target) for target in spec.targets}
    todo = [r for r in every if not is_current(result_file(folder, *r), run_settings(spec), sentences[r[0]])]
    log.info("compare: %d fine-tuning runs, %d already done", len(every), len(every) - len(todo))
    pending = {remote.remote(asdict(spec), job_to_dict(job), inits[init], target, init, budget, seed,
                             str(result_file(folder, target, init, budget, seed)), sentences[target]):
               (target, init, budget, seed)
               for target, init, budget, seed in todo}
    began, finished = time.perf_counter(), 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        target, init, budget, seed = pending.pop(ready[0])
        summary = ray.get(ready[0])
        finished += 1
        rate = finished / (time.perf_counter() - began)
        log.info("compare: %s %s budget %s seed %d: %d steps, dev loss %.3f → %.3f (%d/%d, ETA %.0f s)", target, init,
                 budget_name(budget), seed, summary["steps"], summary["start_dev_loss"], summary["dev_loss"], finished,
                 len(todo), len(pending) / rate)


def finetune_run(spec_dict: dict, job_dict: dict, phi: dict[str, torch.Tensor], target: str, init: str,
                 budget: int | None, seed: int, out: str, sentences: dict[str, str]) -> dict[str, Any]:
    """One fine-tuning run and its translations of the dev and test pairs whose
    ``sentence_digests`` are ``sentences``, written to ``out`` (a Ray task)."""
    from distmeta.compare.config import build_compare
    from distmeta.compare.finetune import finetune_on_dev, translate
    from distmeta.device import resolve_device

    spec, job = build_compare(spec_dict), job_from_dict(job_dict, "meta job")
    torch.set_num_threads(max(1, int(spec.finetune.cpus)))
    device = resolve_device("cuda" if spec.finetune.gpus > 0 else "cpu")
    pipeline, tasks = _data(job, [target])
    model, size = build_model(job), transformer_size(job)
    train_rows = tasks.budget_rows(target, budget, seed) if budget != 0 else tasks.rows(target, "train")[:0]
    dev_rows = tasks.rows(target, "val")[:spec.decode.dev_pairs]
    test_rows = tasks.rows(target, "test")[:spec.decode.test_pairs]
    began = time.perf_counter()
    tuned, rate, dev_losses = finetune_on_dev(model, phi, tasks, train_rows, dev_rows, spec.finetune, seed, device)
    summary = {"target": target, "init": init, "budget": budget_name(budget), "seed": seed, "settings": run_settings(spec),
               "lr": rate, "dev_loss_by_lr": {str(r): loss for r, loss in dev_losses.items()},
               "train_pairs": len(train_rows), "train_tokens": tasks.target_tokens(train_rows),
               "steps": tuned.steps, "best_step": tuned.best_step, "dev_loss": tuned.dev_loss,
               "start_dev_loss": tuned.start_dev_loss, "curve": tuned.curve,
               "finetune_s": time.perf_counter() - began, "test_sources_cut": tasks.sources_cut(test_rows),
               "sentences_sha256": sentences}
    summary["dev_hypotheses"] = translate(tuned.phi, size, tasks, pipeline, dev_rows, spec.decode, device)
    summary["test_hypotheses"] = translate(tuned.phi, size, tasks, pipeline, test_rows, spec.decode, device)
    summary["seconds"] = time.perf_counter() - began
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(summary))
    path.with_suffix(".tmp").replace(path)
    return summary


def references(job: JobConfig, target: str, split: str, count: int) -> tuple[list[str], list[str]]:
    """The first ``count`` (source, English) pairs of ``target``'s split, raw, in file order:
    the same pairs, in the same order, that fine-tuning decoded."""
    table = read_source(translation_source(job), [target], [split])
    return table.column("src").to_pylist()[:count], table.column("tgt").to_pylist()[:count]


def stage_report(spec: CompareConfig, job: JobConfig, folder: Path) -> None:
    from distmeta.compare.report import write_report

    tokens = training_tokens(job, spec.targets)
    every = runs(spec, tokens)
    pairs = {target: _scored_pairs(spec, job, target) for target in spec.targets}
    sentences = {target: _digests(pairs[target]) for target in spec.targets}
    missing = [r for r in every if not is_current(result_file(folder, *r), run_settings(spec), sentences[r[0]])]
    if missing:
        raise FileNotFoundError(f"{len(missing)} fine-tuning result(s) missing, or made under other finetune/decode "
                                f"settings or for other dev/test sentences (e.g. {result_file(folder, *missing[0])}); "
                                "run --stage finetune first")
    results = {r: json.loads(result_file(folder, *r).read_text()) for r in every}
    refs = {(target, split): targets for target in spec.targets for split, (_, targets) in pairs[target].items()}
    write_report(spec, job, folder, results, refs, distinct_budgets(spec, tokens), meta_updates(folder))


STAGE_FUNCTIONS = {"prepare": stage_prepare, "meta": stage_meta, "pretrain": stage_pretrain,
                   "finetune": stage_finetune, "report": stage_report}
