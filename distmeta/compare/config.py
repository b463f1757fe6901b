"""The comparison file: which languages, the meta-training job, and how pre-training,
fine-tuning and decoding are run, validated at load like a job file."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from distmeta.config import (
    HIGH_RESOURCE,
    ConfigError,
    JobConfig,
    apply_overrides,
    job_from_dict,
    names_key,
    read_config_file,
    spec_from_dict,
)

LOW_RESOURCE = ("ron", "lav", "fin", "tur", "kor")  # Gu et al.'s Ro, Lv, Fi, Tr, Ko
INITS = ("maml", "pretrain", "random")  # the initialisations compared, baseline of the test second


@dataclass(frozen=True)
class PretrainConfig:
    workers: int = 2  # Ray Train data-parallel workers
    worker_cpus: float = 1.0
    use_gpu: bool = False


@dataclass(frozen=True)
class FinetuneConfig:
    budgets: list[int | str] = field(default_factory=lambda: [0, 4000, 16000, 64000, "all"])  # target tokens
    seeds: list[int] = field(default_factory=lambda: [0])  # each picks the pairs of a budget and the batch order
    lr: float | list[float] = 3e-4  # Adam; several: each run keeps the rate whose best dev loss is lowest
    batch_tokens: int = 2000  # target tokens per update
    max_steps: int = 2000
    eval_every: int = 50  # steps between dev-loss checks
    patience: int = 4  # checks without improvement before stopping (the best Φ is kept)
    adapt: list[str] = field(default_factory=lambda: ["*"])  # parameters fine-tuned (fnmatch), e.g. [embed.*, encoder.*]
    cpus: float = 1.0  # per fine-tuning run (runs go in parallel as Ray tasks)
    gpus: float = 0.0

    def rates(self) -> list[float]:
        return [float(r) for r in self.lr] if isinstance(self.lr, list) else [float(self.lr)]


@dataclass(frozen=True)
class DecodeConfig:
    beam: int = 4  # 1: greedy
    alpha: float = 0.6  # GNMT length penalty
    max_len: int = 64  # output pieces
    dev_pairs: int = 500  # the first dev pairs: their loss early-stops fine-tuning and picks its rate; dev chrF
    test_pairs: int = 1000  # the first test pairs, scored in the report
    batch: int = 64  # sentences decoded at once


@dataclass(frozen=True)
class CompareConfig:
    name: str = "translation_compare"
    meta_job: str = ""  # the meta-training job file (relative to this file); its task languages are replaced by sources
    overrides: list[str] = field(default_factory=list)  # key=value overrides of that job
    sources: list[str] = field(default_factory=lambda: list(HIGH_RESOURCE))  # meta-training / pre-training languages
    targets: list[str] = field(default_factory=lambda: list(LOW_RESOURCE))  # low-resource languages fine-tuned on
    vocab_languages: list[str] = field(default_factory=list)  # whose training text trains the tokeniser (empty: sources + targets)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    bootstrap: int = 1000  # sacrebleu paired-bootstrap resamples

    def budget_tokens(self) -> list[int | None]:
        """The budgets as token counts, ``None`` for all of a target's training pairs."""
        return [None if b == "all" else int(b) for b in self.finetune.budgets]


def is_compare_file(path: str | Path) -> bool:
    """A comparison file names a ``meta_job``; job and sweep files never do."""
    return names_key(path, "meta_job")


def build_compare(raw: dict[str, Any]) -> CompareConfig:
    """A CompareConfig from its ``dataclasses.asdict`` form (as it travels to Ray tasks)."""
    return spec_from_dict(CompareConfig, raw, "comparison")


def budget_name(tokens: int | None) -> str:
    return "all" if tokens is None else str(tokens)


def load_compare(path: str | Path, overrides: list[str] = ()) -> tuple[CompareConfig, JobConfig]:
    """The comparison (with ``key=value`` ``overrides`` of its own keys, as ``--set`` gives
    them) and its meta-training job (sources as its tasks, the shared vocabulary languages
    set), every problem reported at once, each naming its key.

    Raises:
        ConfigError: listing the problems.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    spec = spec_from_dict(CompareConfig, apply_overrides(read_config_file(path), list(overrides)), str(path))
    job_path = path.parent / spec.meta_job
    if not spec.meta_job or not job_path.is_file():
        raise ConfigError([f"meta_job: no job file {str(job_path)!r}; name it relative to this file"], str(path))
    f, d = spec.finetune, spec.decode
    vocab = spec.vocab_languages or [*spec.sources, *spec.targets]
    rules = [
        (bool(spec.sources), "sources", "must name at least one language"),
        (bool(spec.targets), "targets", "must name at least one language"),
        (not set(spec.sources) & set(spec.targets), "targets", "must not overlap sources (a target is unseen in meta-training)"),
        (set(spec.sources) | set(spec.targets) <= set(vocab), "vocab_languages",
         "must include every source and target language, or be empty (the encoded store holds the "
         "tokeniser's languages; a tokeniser that never sees target text is not supported)"),
        (spec.pretrain.workers >= 1, "pretrain.workers", "must be >= 1"),
        (spec.pretrain.worker_cpus > 0, "pretrain.worker_cpus", "must be > 0"),
        (bool(f.budgets) and all(b == "all" or (isinstance(b, int) and b >= 0) for b in f.budgets), "finetune.budgets",
         "must be target-token counts >= 0 or 'all'"),
        (bool(f.seeds) and all(s >= 0 for s in f.seeds), "finetune.seeds", "must be seeds >= 0"),
        (bool(f.rates()) and all(math.isfinite(r) and r > 0 for r in f.rates()), "finetune.lr",
         "must be a rate or a list of rates, each finite and > 0"),
        (f.batch_tokens >= 1, "finetune.batch_tokens", "must be >= 1"),
        (f.max_steps >= 1, "finetune.max_steps", "must be >= 1"),
        (f.eval_every >= 1, "finetune.eval_every", "must be >= 1"),
        (f.patience >= 1, "finetune.patience", "must be >= 1"),
        (bool(f.adapt), "finetune.adapt", "must name at least one pattern"),
        (f.cpus > 0 and f.gpus >= 0, "finetune.cpus", "finetune.cpus must be > 0 and finetune.gpus >= 0"),
        (d.beam >= 1, "decode.beam", "must be >= 1"),
        (d.alpha >= 0, "decode.alpha", "must be >= 0"),
        (min(d.max_len, d.dev_pairs, d.test_pairs, d.batch) >= 1, "decode.max_len",
         "decode.max_len, dev_pairs, test_pairs and batch must be >= 1"),
        (spec.bootstrap >= 100, "bootstrap", "must be >= 100 resamples"),
    ]
    problems = [f"{key}: {message}" for ok, key, message in rules if not ok]
    if problems:
        raise ConfigError(problems, str(path))
    job = meta_job(spec, read_config_file(job_path), f"{path}: meta_job")
    if job.task.dataset != "translation":
        raise ConfigError([f"meta_job: {spec.meta_job} has task.dataset {job.task.dataset!r}; it must be translation"],
                          str(path))
    if job.algorithm.name == "pretrain":
        raise ConfigError(["meta_job: algorithm.name is pretrain; the meta-training job uses a MAML-family algorithm "
                           "(the pre-training baseline is built from it)"], str(path))
    return spec, job


def meta_job(spec: CompareConfig, raw_job: dict[str, Any], source: str) -> JobConfig:
    """The meta-training job: the file's job with the overrides, the sources as its tasks and
    the comparison's vocabulary languages."""
    vocab = spec.vocab_languages or [*spec.sources, *spec.targets]
    if not isinstance(raw_job, dict):
        raise ConfigError([f"expected a job mapping, got {type(raw_job).__name__}"], source)
    raw = apply_overrides(raw_job, spec.overrides)
    task = raw.setdefault("task", {})
    if not isinstance(task, dict):
        raise ConfigError([f"task: expected a mapping, got {type(task).__name__}"], source)
    raw["task"] = {**task, "languages": list(spec.sources), "vocab_languages": list(vocab)}
    return job_from_dict(raw, source)


def pretrain_job(job: JobConfig, steps: int) -> JobConfig:
    """The pre-training baseline's job, equal in budget to the meta-training run of ``job``
    that made ``steps`` updates (fewer than ``train.steps`` when its time limit stopped it):
    the same number of updates of Φ, each from the same number of tasks (languages drawn the
    same way), each task seeing the same target tokens (``support_tokens + query_tokens``,
    all in one batch of its language, since there is no inner step), and the same outer
    optimizer."""
    t = job.task
    return replace(job, name=f"{job.name}_pretrain",
                   task=replace(t, query_tokens=t.support_tokens + t.query_tokens),
                   algorithm=replace(job.algorithm, name="pretrain", inner_steps=0),
                   train=replace(job.train, steps=steps, time_limit_s=None))
