"""A ReLU MLP regressor: the MAML sinusoid model is ``make_mlp(1, (40, 40), 1)``."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from distmeta.models.base import TaskModel, regression_loss, split_xy, vmapped
from distmeta.types import Batch, Metrics, Params


def init_mlp(generator: torch.Generator, sizes: tuple[int, ...]) -> Params:
    """PyTorch's Linear default init (uniform ±1/√fan_in), layers named ``layer{i}``."""
    params: Params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        bound = 1.0 / math.sqrt(fan_in)
        params[f"layer{i}.weight"] = (torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound
        params[f"layer{i}.bias"] = (torch.rand(fan_out, generator=generator) * 2 - 1) * bound
    return params


def mlp_forward(params: Params, x: Tensor) -> Tensor:
    """Outputs for inputs ``x`` (B, in); ReLU between layers, linear output."""
    layers = sum(name.endswith(".weight") for name in params)
    for i in range(1, layers + 1):
        x = x @ params[f"layer{i}.weight"].t() + params[f"layer{i}.bias"]
        if i < layers:
            x = torch.relu(x)
    return x


def _loss(params: Params, batch: Batch) -> tuple[Tensor, Metrics]:
    inputs, targets = split_xy(batch)
    return regression_loss(mlp_forward(params, inputs), targets)


def make_mlp(inputs: int = 1, hidden: tuple[int, ...] = (40, 40), outputs: int = 1) -> TaskModel:
    """The MLP as a TaskModel; its batched form is the generic ``vmap`` of the per-task loss."""
    return TaskModel(
        name="mlp",
        init=partial(init_mlp, sizes=(inputs, *hidden, outputs)),
        loss=_loss,
        batched_loss=vmapped(_loss),
    )
