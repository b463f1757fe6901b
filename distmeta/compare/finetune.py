"""Fine-tuning an initialisation on one target language, and translating with it: plain
functions over a parameter dict, no Ray.

Fine-tuning is ordinary supervised training on the target's budgeted training pairs
(token-budgeted batches, Adam), with early stopping on the teacher-forced loss of the
target's dev pairs: the Φ of the best check is kept, and training stops after
``patience`` checks without improvement.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import NamedTuple, Sequence

import numpy as np
import torch

from distmeta.algorithms.inner import adapted_names
from distmeta.compare.config import DecodeConfig, FinetuneConfig
from distmeta.data.translation import TextPipeline, TranslationTasks
from distmeta.models.base import TaskModel
from distmeta.models.transformer import TransformerSize, beam_search, greedy_decode
from distmeta.optim import adam
from distmeta.types import Params

log = logging.getLogger("distmeta.compare")


class Finetuned(NamedTuple):
    phi: Params
    steps: int  # updates made
    best_step: int  # the update after which ``phi`` was taken (0: the initialisation itself)
    dev_loss: float  # teacher-forced, per target token, of ``phi``
    start_dev_loss: float  # of the initialisation
    curve: list[tuple[int, float]]  # (step, dev loss) at each check


def token_batches(tasks: TranslationTasks, rows: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """``rows`` cut, in order, into batches of at most ``batch_tokens`` target tokens (one
    pair at least)."""
    batches = []
    while len(rows):
        batch, rows = tasks.take_tokens(rows, batch_tokens)
        batches.append(np.array(batch))
    return batches


@torch.no_grad()
def mean_loss(model: TaskModel, phi: Params, tasks: TranslationTasks, batches: Sequence[np.ndarray],
              device: torch.device) -> float:
    """Teacher-forced cross-entropy per target token over ``batches``."""
    total, tokens = 0.0, 0.0
    for rows in batches:
        loss, metrics = model.loss(phi, tuple(t.to(device) for t in tasks.batch(rows)))
        total += float(loss) * float(metrics["tokens"])
        tokens += float(metrics["tokens"])
    return total / max(tokens, 1.0)


def finetune(model: TaskModel, phi: Params, tasks: TranslationTasks, train_rows: np.ndarray, dev_rows: np.ndarray,
             config: FinetuneConfig, seed: int, device: torch.device) -> Finetuned:
    """Fine-tune ``phi`` on ``train_rows`` (no rows: no training) and keep the best Φ by dev loss.

    Raises:
        FloatingPointError: the training loss went NaN/infinite (lower finetune.lr).
    """
    phi = {n: p.detach().to(device) for n, p in phi.items()}
    dev = token_batches(tasks, dev_rows, config.batch_tokens)
    start_loss = mean_loss(model, phi, tasks, dev, device)
    best = Finetuned(phi, 0, 0, start_loss, start_loss, [(0, start_loss)])
    if len(train_rows) == 0:
        return best
    names = adapted_names(phi, config.adapt)
    optimizer = adam(config.rates()[0])
    state = optimizer.init({n: phi[n] for n in names})
    rng = np.random.default_rng([seed, 104729])
    batches: list[np.ndarray] = []
    since_best, curve = 0, list(best.curve)
    for step in range(1, config.max_steps + 1):
        if not batches:  # a new epoch, in a new order
            batches = token_batches(tasks, rng.permutation(train_rows), config.batch_tokens)
        rows = batches.pop(0)
        leaves = {n: phi[n].detach().requires_grad_() for n in names}
        loss, _ = model.loss({**phi, **leaves}, tuple(t.to(device) for t in tasks.batch(rows)))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"fine-tuning loss is {loss.item()} at step {step}; lower finetune.lr")
        grads = dict(zip(names, torch.autograd.grad(loss, list(leaves.values()))))
        adapted, state = optimizer.update({n: phi[n] for n in names}, grads, state)
        phi = {**phi, **adapted}
        if step % config.eval_every == 0 or step == config.max_steps:
            dev_loss = mean_loss(model, phi, tasks, dev, device)
            curve.append((step, dev_loss))
            if dev_loss < best.dev_loss:
                best, since_best = Finetuned(phi, step, step, dev_loss, start_loss, curve), 0
            else:
                since_best += 1
                if since_best >= config.patience:
                    break
    return best._replace(steps=step, curve=curve)


def finetune_on_dev(model: TaskModel, phi: Params, tasks: TranslationTasks, train_rows: np.ndarray,
                    dev_rows: np.ndarray, config: FinetuneConfig, seed: int,
                    device: torch.device) -> tuple[Finetuned, float, dict[float, float]]:
    """``finetune`` at each of ``config``'s learning rates, keeping the one whose best dev loss
    is lowest (model selection on dev, never on test). Returns it, its rate and every rate's
    dev loss (infinite where the rate made training diverge).

    Raises:
        FloatingPointError: training diverged at every rate.
    """
    tried, losses = {}, {}
    for rate in config.rates() if len(train_rows) else config.rates()[:1]:
        try:
            tried[rate] = finetune(model, phi, tasks, train_rows, dev_rows, replace(config, lr=rate), seed, device)
            losses[rate] = tried[rate].dev_loss
        except FloatingPointError as error:
            if len(config.rates()) == 1:
                raise
            log.warning("fine-tuning at rate %g diverged (%s); trying the other rates", rate, error)
            losses[rate] = math.inf
    if not tried:
        raise FloatingPointError(f"fine-tuning diverged at every rate {config.rates()}; lower finetune.lr")
    rate = min(tried, key=lambda r: tried[r].dev_loss)
    return tried[rate], rate, losses


@torch.no_grad()
def translate(phi: Params, size: TransformerSize, tasks: TranslationTasks, pipeline: TextPipeline, rows: np.ndarray,
              config: DecodeConfig, device: torch.device) -> list[str]:
    """Detokenised English for the source sentences of ``rows``, in their order (beam search,
    or batched greedy decoding for a beam of 1)."""
    phi = {n: p.to(device) for n, p in phi.items()}
    out: list[str] = []
    for begin in range(0, len(rows), config.batch):
        src = tasks.batch(rows[begin:begin + config.batch])[0].to(device)
        if config.beam == 1:
            ids = greedy_decode(phi, size, src, config.max_len)
        else:
            ids = beam_search(phi, size, src, config.beam, config.max_len, config.alpha)
        out += [pipeline.decode(row[1:].tolist()) for row in ids.cpu()]
    return out
