"""Outer optimizers as (init, update) pairs of pure functions over parameter dicts.

Pure so that the in-process loop and the parameter server apply identical arithmetic, and
so that optimizer state is plain tensors that checkpoint as they are.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from distmeta.types import Params

OptState = dict[str, Params | int]


class Optimizer(NamedTuple):
    """``init(params) -> state``; ``update(params, grads, state) -> (params, state)``."""

    init: Callable[[Params], OptState]
    update: Callable[[Params, Params, OptState], tuple[Params, OptState]]


def sgd(lr: float) -> Optimizer:
    """Plain SGD: with Reptile's pseudo-gradient this is Φ ← Φ + ε·mean(θ̂ − Φ) for lr = ε."""

    def init(params: Params) -> OptState:
        return {"count": 0}

    def update(params: Params, grads: Params, state: OptState) -> tuple[Params, OptState]:
        new = {n: p - lr * grads[n] for n, p in params.items()}
        return new, {"count": int(state["count"]) + 1}

    return Optimizer(init, update)


def adam(lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Optimizer:
    """Adam (Kingma & Ba 2015) with bias correction, as ``torch.optim.Adam`` computes it."""
    beta1, beta2 = betas

    def init(params: Params) -> OptState:
        zeros = lambda: {n: torch.zeros_like(p) for n, p in params.items()}  # noqa: E731
        return {"count": 0, "mu": zeros(), "nu": zeros()}

    def update(params: Params, grads: Params, state: OptState) -> tuple[Params, OptState]:
        # Few temporaries (lerp, addcmul, addcdiv; in-place only on tensors made here): on a
        # 10M-parameter flat buffer each extra Φ-sized temporary costs tens of milliseconds.
        count = int(state["count"]) + 1
        mu = {n: torch.lerp(m, grads[n], 1 - beta1) for n, m in state["mu"].items()}
        nu = {n: torch.addcmul(v * beta2, grads[n], grads[n], value=1 - beta2) for n, v in state["nu"].items()}
        step = lr / (1 - beta1**count)
        denom_scale = (1 - beta2**count) ** 0.5
        new = {n: torch.addcdiv(p, mu[n], nu[n].sqrt().div_(denom_scale).add_(eps), value=-step)
               for n, p in params.items()}
        return new, {"count": count, "mu": mu, "nu": nu}

    return Optimizer(init, update)


OPTIMIZERS = ("adam", "sgd")


def build_optimizer(name: str, lr: float) -> Optimizer:
    """The outer optimizer named in a job file.

    Raises:
        ValueError: unknown name.
    """
    if name == "adam":
        return adam(lr)
    if name == "sgd":
        return sgd(lr)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
