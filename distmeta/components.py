"""Build the pieces a job names (model, algorithm, tasks, optimizer) from its config."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from distmeta.algorithms import Algorithm, InnerLoop, build_algorithm
from distmeta.config import JobConfig
from distmeta.data.omniglot import DataError, default_cache_dir, load_omniglot
from distmeta.data.omniglot_tasks import OmniglotTasks
from distmeta.data.sampling import TaskSampler
from distmeta.data.sinusoid import SinusoidTasks
from distmeta.data.translation import (
    ParallelText,
    TranslationTasks,
    open_store,
    prepare_translation,
    source_digest,
)
from distmeta.models import TaskModel, make_conv4, make_mlp
from distmeta.models.transformer import TransformerSize, make_transformer
from distmeta.optim import Optimizer, build_optimizer, schedule


def build_model(job: JobConfig) -> TaskModel:
    """The job's model; conv4's head has one output per way."""
    m = job.model
    if m.name == "conv4":
        return make_conv4(ways=job.task.ways, width=m.width, downsample=m.downsample)
    if m.name == "transformer":
        return make_transformer(transformer_size(job))
    return make_mlp(1, tuple(m.hidden), 1)


def transformer_size(job: JobConfig) -> TransformerSize:
    m = job.model
    return TransformerSize(job.task.vocab, m.dim, m.heads, m.ffn, m.layers, m.layers, m.shared_embeddings)


def train_inner_loop(job: JobConfig) -> InnerLoop:
    """The inner loop used during meta-training."""
    a = job.algorithm
    return InnerLoop(lr=a.inner_lr, steps=a.inner_steps, adapt=tuple(a.adapt), optimizer=a.inner_optimizer)


def eval_inner_loop(job: JobConfig, steps: int | None = None) -> InnerLoop:
    """The inner loop used at evaluation: same step size, ``eval.inner_steps`` steps."""
    return train_inner_loop(job)._replace(steps=job.eval.inner_steps if steps is None else steps)


def build_job_algorithm(job: JobConfig) -> Algorithm:
    return build_algorithm(job.algorithm.name, train_inner_loop(job))


def build_job_optimizer(job: JobConfig) -> Optimizer:
    o = job.optimizer
    return build_optimizer(o.name, schedule(o.schedule, o.lr, o.schedule_steps or job.train.steps))


def data_cache(job: JobConfig) -> Path:
    """Where preprocessed data is cached: ``data.cache``, else the default cache folder."""
    return Path(job.data.cache) if job.data.cache else default_cache_dir()


def build_sampler(job: JobConfig) -> TaskSampler:
    """The job's task sampler for meta-training.

    Raises:
        DataError: Omniglot data missing or corrupt.
        ValueError: a task shape the split cannot provide.
    """
    t = job.task
    if t.dataset == "sinusoid":
        return SinusoidTasks(shots=t.shots, queries=t.queries, seed=job.seed)
    if t.dataset == "translation":
        _, store = prepare_translation(translation_source(job), t.vocab_languages or t.languages, t.vocab, data_cache(job))
        return TranslationTasks(open_store(store), t.languages, t.support_tokens, t.query_tokens, t.max_len, job.seed)
    data = load_omniglot(job.data.omniglot, job.data.cache)
    return OmniglotTasks(data, ways=t.ways, shots=t.shots, queries=t.queries, protocol=t.protocol,
                         rotations=tuple(t.rotations), val_characters=t.val_characters, seed=job.seed)


def data_sha256(job: JobConfig) -> str | None:
    """What the job's data is, wherever it lies (None: generated from the seed), so a run
    resumed with its data elsewhere can check that it is the same.

    Raises:
        DataError: the data is missing or unreadable.
    """
    if job.task.dataset == "sinusoid":
        return None
    if job.task.dataset == "translation":
        return source_digest(translation_source(job))
    return load_omniglot(job.data.omniglot, job.data.cache).sha256


def translation_source(job: JobConfig) -> str | list[ParallelText]:
    """The job's translation data: its plain-text files, its Parquet file, else $DISTMETA_TRANSLATION.

    Raises:
        DataError: none of them is set.
    """
    if job.data.parallel_text:
        return [ParallelText(**entry) for entry in job.data.parallel_text]
    source = job.data.translation or os.environ.get("DISTMETA_TRANSLATION")
    if not source:
        raise DataError("no translation data: set data.translation (a Parquet file), data.parallel_text or "
                        "$DISTMETA_TRANSLATION")
    return source


def with_queries(sampler: TaskSampler, queries: int) -> TaskSampler:
    """The same sampler with another query count (the data stays shared); samplers whose query
    sets are token budgets (translation) are returned as they are."""
    return replace(sampler, queries=queries) if hasattr(sampler, "queries") else sampler
