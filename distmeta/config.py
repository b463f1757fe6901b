"""Job files are data: YAML mapped onto typed dataclasses, every error reported at once.

A job file names only what differs from the defaults below. ``load_job`` rejects unknown
keys, wrong types and impossible values with messages that name the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Sequence

import yaml

from distmeta.data.omniglot import DRAWINGS_PER_CHARACTER, EXPECTED_CHARACTERS, VINYALS_TRAIN_CHARACTERS
from distmeta.storage import Location

# Gu et al.'s role for Tatoeba's 21 largest X→English sets (../shared/data/translation/README.md).
HIGH_RESOURCE = ("deu", "fra", "spa", "ita", "por", "nld", "dan", "swe", "ces", "pol", "bul", "ell", "hun", "rus",
                 "ukr", "heb", "ara", "jpn", "zho", "mar", "kab")
VINYALS_TEST_CHARACTERS = sum(EXPECTED_CHARACTERS.values()) - VINYALS_TRAIN_CHARACTERS
BACKGROUND_CHARACTERS = EXPECTED_CHARACTERS["images_background"]


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-3`` is a float (YAML 1.1 would read it as a string) and
    a key given twice in one mapping is an error (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:  # the mapping's own scalar keys (merged ones may be overridden)
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key_node.value!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\.inf|\.nan)$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """Every problem found in a job file, one per line."""

    def __init__(self, problems: list[str], source: str = "job") -> None:
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


def choice(*allowed: str, default: str) -> Any:
    return field(default=default, metadata={"choices": allowed})


@dataclass(frozen=True)
class TaskConfig:
    dataset: str = choice("omniglot", "sinusoid", "translation", default="omniglot")
    ways: int = 5  # classes per task (omniglot)
    shots: int = 1  # support examples per class (omniglot) or support points (sinusoid)
    queries: int = 15  # query examples per class / query points, during meta-training
    protocol: str = choice("vinyals", "alphabet", default="vinyals")  # omniglot character split
    rotations: list[int] = field(default_factory=lambda: [0, 90, 180, 270])  # classes = char × rotation
    val_characters: int = 100  # meta-validation characters carved from meta-train
    languages: list[str] = field(default_factory=lambda: list(HIGH_RESOURCE))  # translation: X→English tasks
    support_tokens: int = 1000  # translation: target tokens per support set
    query_tokens: int = 1000  # translation: target tokens per query set
    max_len: int = 64  # translation: longer sentences are cut (sentencepiece pieces)
    vocab: int = 8000  # translation: shared sentencepiece vocabulary size
    vocab_languages: list[str] = field(default_factory=list)  # translation: whose training text trains it (empty: languages)


@dataclass(frozen=True)
class ModelConfig:
    name: str = choice("conv4", "mlp", "transformer", default="conv4")
    width: int = 64  # conv4 filters
    downsample: str = choice("stride", "maxpool", default="stride")  # conv4 downsampling
    hidden: list[int] = field(default_factory=lambda: [40, 40])  # mlp hidden sizes
    dim: int = 256  # transformer width
    heads: int = 4
    ffn: int = 1024
    layers: int = 3  # transformer encoder and decoder layers each
    shared_embeddings: bool = True  # transformer: one table for source, target and output


@dataclass(frozen=True)
class AlgorithmConfig:
    name: str = choice("maml", "fomaml", "reptile", "pretrain", default="maml")
    inner_lr: float = 0.4  # inner step size α
    inner_steps: int = 1  # inner steps during meta-training
    inner_optimizer: str = choice("sgd", "adam", default="sgd")  # adam: first-order algorithms only
    adapt: list[str] = field(default_factory=lambda: ["*"])  # fnmatch patterns of adapted params


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = choice("adam", "sgd", default="adam")  # Reptile's ε is sgd's lr
    lr: float = 1e-3
    schedule: str = choice("constant", "linear", "cosine", default="constant")  # lr decayed to 0 over schedule_steps
    schedule_steps: int | None = None  # updates the decay takes (None: train.steps)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # outer (meta) steps
    meta_batch: int = 32  # tasks per outer step
    time_limit_s: float | None = None  # stop early after this much wall time
    log_every: int = 20
    val_every: int = 200  # 0 disables meta-validation
    val_tasks: int = 100
    checkpoint_every: int = 500
    keep_checkpoints: int = 3


@dataclass(frozen=True)
class EvalConfig:
    tasks: int = 600  # fresh meta-test tasks for the final report
    queries: int = 15  # query examples per class at evaluation
    inner_steps: int = 3  # adaptation steps at evaluation (may exceed training's)
    split: str = choice("test", "val", "train", default="test")
    batch: int = 50  # tasks adapted at once


@dataclass(frozen=True)
class RuntimeConfig:
    path: str = choice("auto", "batched", "vmap", "loop", default="auto")  # how tasks are batched
    precision: str = choice("fp32", "bf16", default="fp32")  # bf16 = autocast, fp32 master weights
    compile: bool = False  # torch.compile the batched loss (seconds to compile; pays off on long runs)
    device: str = choice("auto", "cpu", "cuda", default="auto")
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    workers: int = 0  # Ray task-worker actors; 0 computes in this process
    address: str | None = None  # Ray cluster to join (None: $RAY_ADDRESS, else an embedded local Ray)
    worker_cpus: float = 1.0  # CPUs reserved (and torch threads) per worker
    worker_gpus: float = 0.0  # GPUs per worker; fractions share a GPU
    placement: str = choice("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD", default="PACK")  # workers' gang placement
    scale_up_timeout_s: float = 0.0  # wait this long for an autoscaling cluster to add the workers' nodes (0: fail fast)
    mode: str = choice("sync", "async", default="sync")  # sync: reproducible steps; async: apply slices on arrival
    staleness: int = 2  # async: drop slices computed at a Φ more than this many steps old
    contributions: str = choice("fp32", "bf16", default="fp32")  # slices' dtype on the wire (bf16: half the bytes, not bit-identical)
    server_threads: int = 2  # torch threads of the parameter server's apply (sync workers idle meanwhile)
    evaluator_cpus: float = 0.0  # CPUs reserved for the validation actor (0: shares the workers' CPUs)
    evaluator_gpus: float = 0.0
    storage: str | None = None  # folder or pyarrow.fs URI (s3://, gs://) for runs (None: runs/); --out overrides


PARALLEL_TEXT_KEYS = ("src", "tgt", "src_lang", "split", "tgt_lang")


@dataclass(frozen=True)
class DataConfig:
    omniglot: str | None = None  # the two zips or their folders; else $DISTMETA_OMNIGLOT, else download
    translation: str | None = None  # Parquet of X→English pairs; else $DISTMETA_TRANSLATION
    parallel_text: list[dict] = field(default_factory=list)  # or line-aligned files: [{src, tgt, src_lang, split, tgt_lang?}]
    cache: str | None = None  # preprocessed arrays; else $DISTMETA_CACHE, else ~/.cache/distmeta


@dataclass(frozen=True)
class JobConfig:
    name: str = "job"
    seed: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)


def build_config(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """An instance of the dataclass ``cls`` from a mapping, appending every problem found."""
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'job'}: expected a mapping, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in names:
            problems.append(f"{where}: unknown key; allowed keys: {', '.join(names)}")
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = build_config(hint, value, f"{where}.", problems)
        elif _type_ok(hint, value):
            allowed = names[key].metadata.get("choices")
            if allowed and value not in allowed:
                problems.append(f"{where}: {value!r} is not allowed; choose one of {', '.join(allowed)}")
            else:
                values[key] = float(value) if hint is float else value
        else:
            problems.append(f"{where}: expected {_type_name(hint)}, got {value!r}")
    return cls(**values)


def _type_ok(hint: Any, value: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(item, v) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return "null" if hint is type(None) else hint.__name__


def _check_values(job: JobConfig) -> list[str]:
    """Impossible values: each rule names its key."""
    t, a, tr, ev = job.task, job.algorithm, job.train, job.eval
    rules = [
        (0 <= job.seed < 2**63, "seed", "must be >= 0 and < 2**63"),
        (t.ways >= 2, "task.ways", "must be >= 2"),
        (t.shots >= 1, "task.shots", "must be >= 1"),
        (t.queries >= 1, "task.queries", "must be >= 1"),
        (t.val_characters >= 1, "task.val_characters", "must be >= 1"),
        (bool(t.rotations) and all(r in (0, 90, 180, 270) for r in t.rotations) and len(set(t.rotations)) == len(t.rotations),
         "task.rotations", "must be distinct values from 0, 90, 180, 270"),
        (math.isfinite(a.inner_lr) and a.inner_lr >= 0, "algorithm.inner_lr", "must be finite and >= 0"),
        (a.inner_steps >= (0 if a.name == "pretrain" else 1), "algorithm.inner_steps", "must be >= 1"),
        (bool(a.adapt), "algorithm.adapt", "must name at least one pattern"),
        (a.inner_optimizer == "sgd" or a.name != "maml", "algorithm.inner_optimizer",
         "adam needs a first-order algorithm (fomaml, reptile): √v has no derivative where a gradient is 0, "
         "so second-order MAML through it is NaN"),
        (a.name != "reptile" or "*" in a.adapt, "algorithm.adapt",
         "reptile must adapt every parameter ('*'): its update moves Φ toward the adapted weights, "
         "so a parameter left out would never train"),
        (math.isfinite(job.optimizer.lr) and job.optimizer.lr > 0, "optimizer.lr", "must be finite and > 0"),
        (job.optimizer.schedule_steps is None or job.optimizer.schedule_steps >= 1, "optimizer.schedule_steps",
         "must be >= 1 or null (train.steps)"),
        (tr.steps >= 1, "train.steps", "must be >= 1"),
        (tr.meta_batch >= 1, "train.meta_batch", "must be >= 1"),
        (tr.time_limit_s is None or 0 < tr.time_limit_s < math.inf, "train.time_limit_s", "must be > 0 and finite, or null"),
        (tr.log_every >= 1, "train.log_every", "must be >= 1"),
        (tr.log_every >= 1 and tr.val_every >= 0 and tr.val_every % tr.log_every == 0, "train.val_every",
         "must be 0 (off) or a multiple of train.log_every (validation is logged with a step's row)"),
        (tr.val_tasks >= 2, "train.val_tasks", "must be >= 2 (a confidence interval needs two)"),
        (tr.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1"),
        (tr.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1"),
        (ev.tasks >= 2, "eval.tasks", "must be >= 2 (a confidence interval needs two)"),
        (ev.queries >= 1, "eval.queries", "must be >= 1"),
        (ev.inner_steps >= 0, "eval.inner_steps", "must be >= 0"),
        (ev.batch >= 1, "eval.batch", "must be >= 1"),
        (not job.runtime.compile or job.runtime.path in ("auto", "batched"), "runtime.compile",
         "needs runtime.path batched or auto"),
        (job.runtime.precision == "fp32" or job.runtime.path != "vmap", "runtime.precision",
         "bf16 needs runtime.path batched, loop or auto: under vmap the convolutions leave autocast and run in fp32"),
        (job.runtime.threads is None or job.runtime.threads >= 1, "runtime.threads", "must be >= 1 or null"),
        (job.runtime.workers >= 0, "runtime.workers", "must be >= 0 (0 = in-process)"),
        (job.runtime.worker_cpus > 0, "runtime.worker_cpus", "must be > 0"),
        (job.runtime.worker_gpus >= 0, "runtime.worker_gpus", "must be >= 0"),
        (job.runtime.device != "cuda" or job.runtime.workers == 0 or job.runtime.worker_gpus > 0, "runtime.device",
         "cuda with Ray task workers needs runtime.worker_gpus > 0: a worker computes on the GPU share Ray reserves "
         "for it, on the CPU without one"),
        (0 <= job.runtime.scale_up_timeout_s < math.inf, "runtime.scale_up_timeout_s", "must be >= 0 and finite"),
        (job.runtime.staleness >= 0, "runtime.staleness", "must be >= 0"),
        (job.runtime.server_threads >= 1, "runtime.server_threads", "must be >= 1"),
        (job.runtime.evaluator_cpus >= 0, "runtime.evaluator_cpus", "must be >= 0"),
        (job.runtime.evaluator_gpus >= 0, "runtime.evaluator_gpus", "must be >= 0"),
        (job.runtime.workers > 0 or job.runtime.mode == "sync", "runtime.mode",
         "async needs Ray task workers (runtime.workers >= 1)"),
        (job.runtime.workers > 0 or job.runtime.contributions == "fp32", "runtime.contributions",
         "bf16 is how slices travel between Ray processes; it needs runtime.workers >= 1"),
    ]
    if t.dataset == "omniglot":
        rules += [
            (t.shots + t.queries <= DRAWINGS_PER_CHARACTER, "task.queries",
             f"task.shots + task.queries = {t.shots + t.queries} exceeds the {DRAWINGS_PER_CHARACTER} drawings per character"),
            (t.shots + ev.queries <= DRAWINGS_PER_CHARACTER, "eval.queries",
             f"task.shots + eval.queries = {t.shots + ev.queries} exceeds the {DRAWINGS_PER_CHARACTER} drawings per character"),
            (job.model.name == "conv4", "model.name", "omniglot tasks need model conv4"),
            (job.model.width >= 1, "model.width", "must be >= 1"),
        ]
        if t.protocol == "vinyals":
            train_chars = VINYALS_TRAIN_CHARACTERS - t.val_characters
            smallest = min(train_chars, t.val_characters, VINYALS_TEST_CHARACTERS) * len(t.rotations)
            rules += [
                (t.val_characters < VINYALS_TRAIN_CHARACTERS, "task.val_characters",
                 f"must be < {VINYALS_TRAIN_CHARACTERS} (the meta-train characters it is carved from)"),
                (t.ways <= smallest, "task.ways",
                 f"{t.ways} ways but the smallest vinyals split has {smallest} classes"),
            ]
        else:  # alphabet: validation characters are whole background alphabets
            rules.append((t.val_characters < BACKGROUND_CHARACTERS, "task.val_characters",
                          f"must be < {BACKGROUND_CHARACTERS} (the background characters it is carved from)"))
    elif t.dataset == "sinusoid":
        rules += [
            (job.model.name == "mlp", "model.name", "sinusoid tasks need model mlp"),
            (bool(job.model.hidden) and all(h >= 1 for h in job.model.hidden), "model.hidden",
             "must be one or more layer sizes, each >= 1"),
        ]
    else:
        m = job.model
        rules += [
            (m.name == "transformer", "model.name", "translation tasks need model transformer"),
            (bool(t.languages), "task.languages", "must name at least one language"),
            (not t.vocab_languages or set(t.languages) <= set(t.vocab_languages), "task.vocab_languages",
             "must include every language of task.languages (or be empty)"),
            (min(t.support_tokens, t.query_tokens, t.max_len) >= 1, "task.support_tokens",
             "task.support_tokens, task.query_tokens and task.max_len must be >= 1"),
            (t.vocab > 260, "task.vocab", "must exceed 260 (4 special ids and 256 byte pieces)"),
            (not (job.data.translation and job.data.parallel_text), "data.parallel_text",
             "name either data.translation (Parquet) or data.parallel_text, not both"),
            (all(isinstance(f, dict) and {"src", "tgt", "src_lang", "split"} <= set(f) <= set(PARALLEL_TEXT_KEYS)
                 and f["split"] in ("train", "dev", "test") and all(isinstance(v, str) for v in f.values())
                 for f in job.data.parallel_text), "data.parallel_text",
             f"each entry needs src, tgt (file paths), src_lang and split (train, dev or test), optionally tgt_lang; "
             f"allowed keys: {', '.join(PARALLEL_TEXT_KEYS)}"),
            (m.dim >= 1 and m.heads >= 1 and m.dim % m.heads == 0, "model.heads", "must divide model.dim"),
            (min(m.ffn, m.layers) >= 1, "model.layers", "model.ffn and model.layers must be >= 1"),
        ]
    return [f"{key}: {message}" for ok, key, message in rules if not ok]


def job_from_dict(raw: Any, source: str = "job") -> JobConfig:
    """A validated JobConfig from parsed YAML.

    Raises:
        ConfigError: listing every unknown key and wrong type; when there are none, every
            impossible value (value rules need well-typed values).
    """
    problems: list[str] = []
    job = build_config(JobConfig, raw, "", problems)
    if not problems:
        problems = _check_values(job)
    if problems:
        raise ConfigError(problems, source)
    return job


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``key.sub=value`` overrides (values parsed as YAML) applied to a raw job mapping.

    Raises:
        ConfigError: an override without ``=``.
    """
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError([f"--set {o!r}: expected key=value" for o in bad], "overrides")
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy
    for override in overrides:
        dotted, text = override.split("=", 1)
        *parents, last = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"--set {dotted}: {part!r} is not a section"], "overrides")
        try:
            node[last] = parse_yaml(text)
        except yaml.YAMLError as error:
            raise ConfigError([f"--set {dotted}: {text!r} is not a YAML value ({error.problem})"], "overrides") from None
    return raw


def read_config_file(path: str | Path) -> Any:
    """The parsed YAML of a job, sweep or comparison file (an empty file is ``{}``).

    Raises:
        ConfigError: not valid YAML.
        FileNotFoundError: no such file.
    """
    try:
        return parse_yaml(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError([f"not valid YAML: {error}"], str(path)) from None
    except UnicodeDecodeError as error:
        raise ConfigError([f"not UTF-8 text: {error}"], str(path)) from None


def spec_from_dict(cls: type, raw: Any, source: str) -> Any:
    """An instance of the dataclass ``cls`` (a sweep or comparison) from parsed YAML.

    Raises:
        ConfigError: listing every unknown key and wrong type.
    """
    problems: list[str] = []
    spec = build_config(cls, raw, "", problems)
    if problems:
        raise ConfigError(problems, source)
    return spec


def names_key(path: str | Path, key: str) -> bool:
    """Whether a config file is a mapping with top-level ``key`` (what tells sweep and
    comparison files from job files); False for a file that does not read as YAML."""
    try:
        raw = read_config_file(path)
    except (OSError, ConfigError):
        return False
    return isinstance(raw, dict) and key in raw


def load_job(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Read, override and validate a job file.

    Raises:
        ConfigError: unreadable YAML, an empty file (it would run the default job unseen), or
            any invalid value (all listed at once).
        FileNotFoundError: no such file.
    """
    raw = read_config_file(path)
    if raw == {} and parse_yaml(Path(path).read_text()) is None:
        raise ConfigError(["the file is empty: a job names at least its task (see jobs/*.yaml)"], str(path))
    return job_from_dict(apply_overrides(raw, list(overrides)), str(path))


def load_run_job(run_dir: str | Path | Location) -> JobConfig:
    """The job a run (folder or URI) was trained with (its ``config.json``, validated again)."""
    path = Location(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder: it has no config.json")
    try:
        raw = json.loads(path.read_bytes())
    except ValueError as error:  # not JSON, or not UTF-8
        raise ConfigError([f"not valid JSON: {error}"], str(path)) from None
    return job_from_dict(raw, str(path))


def job_to_dict(job: JobConfig) -> dict:
    """The resolved job as plain data (what a run directory records)."""
    return dataclasses.asdict(job)


# Keys that say where a job runs and with what resources, not what it computes.
RESOURCE_KEYS = ("runtime.workers", "runtime.address", "runtime.worker_cpus", "runtime.worker_gpus", "runtime.threads",
                 "runtime.placement", "runtime.scale_up_timeout_s", "runtime.evaluator_cpus", "runtime.evaluator_gpus",
                 "runtime.storage")


def changed_keys(before: JobConfig, after: JobConfig, ignore: Sequence[str] = ()) -> list[str]:
    """Dotted keys (``train.steps``) whose values differ between two jobs, except those that
    match a pattern of ``ignore`` (fnmatch: ``train.*``)."""
    old, new = _flat(job_to_dict(before)), _flat(job_to_dict(after))
    return [k for k in old if old[k] != new[k] and not any(fnmatch(k, p) for p in ignore)]


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat
