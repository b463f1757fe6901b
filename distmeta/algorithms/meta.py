"""The outer objectives: MAML, first-order MAML, Reptile and pre-training.

Each algorithm maps (losses, Φ, tasks) to a Contribution: the summed outer gradient of those
tasks. Summing contributions of disjoint task slices gives the contribution of the whole
meta-batch, wherever each slice was computed; that is the seam the executors use.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from distmeta.algorithms.inner import InnerLoop, adapt, expand_to_tasks, metric_sums, num_tasks
from distmeta.types import BatchedLossFn, Contribution, Params, TaskBatch


class TaskLosses(NamedTuple):
    """The batched loss on support sets (``inner``) and on query sets (``outer``).

    Two slots so an executor can hand in a compiled loss where only first derivatives are
    taken (``torch.compile`` has no double backward): always for ``outer``, and for ``inner``
    when the algorithm is not second-order.
    """

    inner: BatchedLossFn
    outer: BatchedLossFn


ContributionFn = Callable[[TaskLosses, Params, TaskBatch], Contribution]


class Algorithm(NamedTuple):
    """A named outer objective; ``contribution`` is pure (no state, no side effects).
    ``second_order`` says whether it differentiates through inner-loop gradients."""

    name: str
    contribution: ContributionFn
    second_order: bool = False


def _leaf_copy(phi: Params) -> Params:
    return {name: p.detach().requires_grad_() for name, p in phi.items()}


def _named(leaves: Params, grads: tuple) -> Params:
    """Gradients by name; a parameter the loss never touched gets an explicit zero."""
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(leaves.items(), grads)}


def maml(inner: InnerLoop, first_order: bool = False) -> Algorithm:
    """MAML: ∇Φ Σₙ lₙ(θ̂ⁿ(Φ)). Second-order keeps the inner steps' Hessian terms; first-order
    treats each inner gradient as a constant, so the outer gradient is Σₙ ∇θ̂ lₙ(θ̂ⁿ).

    Raises:
        ValueError: second-order through inner Adam, whose √v has no derivative where a
            gradient is 0, so the meta-gradient would be NaN.
    """
    if not first_order and inner.optimizer == "adam":
        raise ValueError("second-order MAML cannot differentiate through inner Adam (√v at v = 0 gives NaN); "
                         "use inner SGD, or first-order MAML / Reptile with Adam")

    def contribution(losses: TaskLosses, phi: Params, tasks: TaskBatch) -> Contribution:
        with torch.enable_grad():
            leaves = _leaf_copy(phi)
            adapted = adapt(losses.inner, expand_to_tasks(leaves, num_tasks(tasks.support)), tasks.support,
                            inner, create_graph=not first_order)
            query_losses, metrics = losses.outer(adapted, tasks.query)
            grads = torch.autograd.grad(query_losses.sum(), list(leaves.values()), allow_unused=True)
        return Contribution(_named(leaves, grads), num_tasks(tasks.query), metric_sums(query_losses, metrics))

    return Algorithm("fomaml" if first_order else "maml", contribution, second_order=not first_order)


def reptile(inner: InnerLoop) -> Algorithm:
    """Reptile: the pseudo-gradient Σₙ (Φ − θ̂ⁿ); SGD with step ε on its mean is Reptile's update.

    The reported query metrics are those of the adapted weights.

    Raises:
        ValueError: the inner loop adapts only some parameters: the others would have θ̂ = Φ,
            a zero delta, and never train.
    """
    if "*" not in inner.adapt:
        raise ValueError(f"Reptile moves Φ toward the adapted weights, so it must adapt every parameter "
                         f"(adapt ['*']), not {list(inner.adapt)}: the others would never train")

    def contribution(losses: TaskLosses, phi: Params, tasks: TaskBatch) -> Contribution:
        with torch.enable_grad():
            start = expand_to_tasks(_leaf_copy(phi), num_tasks(tasks.support))
            adapted = adapt(losses.inner, start, tasks.support, inner, create_graph=False)
        with torch.no_grad():
            query_losses, metrics = losses.outer(adapted, tasks.query)
            grad_sum = {n: (phi[n].detach() - adapted[n]).sum(0) for n in phi}
        return Contribution(grad_sum, num_tasks(tasks.query), metric_sums(query_losses, metrics))

    return Algorithm("reptile", contribution)


def pretrain() -> Algorithm:
    """Model pre-training, the baseline: ∇Φ Σₙ lₙ(Φ) on each task's query set, no adaptation."""

    def contribution(losses: TaskLosses, phi: Params, tasks: TaskBatch) -> Contribution:
        with torch.enable_grad():
            leaves = _leaf_copy(phi)
            query_losses, metrics = losses.outer(expand_to_tasks(leaves, num_tasks(tasks.query)), tasks.query)
            grads = torch.autograd.grad(query_losses.sum(), list(leaves.values()), allow_unused=True)
        return Contribution(_named(leaves, grads), num_tasks(tasks.query), metric_sums(query_losses, metrics))

    return Algorithm("pretrain", contribution)


ALGORITHMS: dict[str, Callable[[InnerLoop], Algorithm]] = {
    "maml": lambda inner: maml(inner),
    "fomaml": lambda inner: maml(inner, first_order=True),
    "reptile": reptile,
    "pretrain": lambda inner: pretrain(),
}


def build_algorithm(name: str, inner: InnerLoop) -> Algorithm:
    """The algorithm registered under ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name](inner)
