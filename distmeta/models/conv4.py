"""The MAML Omniglot conv4: 4 × [3×3 conv, batch norm on batch statistics, ReLU], linear head.

Batch norm is written from ``var_mean`` instead of ``F.batch_norm``: under ``vmap`` the
built-in op gave wrong second-order gradients (torch 2.13), and the explicit form also lets
the grouped, task-batched forward normalise each task with its own statistics.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from distmeta.models.base import TaskModel, classification_loss, split_xy
from distmeta.models.grouped_conv import grouped_conv2d
from distmeta.types import Batch, Metrics, Params

EPS = 1e-5
DOWNSAMPLING = ("stride", "maxpool")


def init_conv4(
    generator: torch.Generator, ways: int, in_channels: int = 1, width: int = 64, blocks: int = 4
) -> Params:
    """Xavier-uniform convolutions and head, unit BN scale, zero biases.

    Convolutions have no bias: batch norm on batch statistics subtracts it again exactly,
    so it would only collect rounding noise (which Adam amplifies). Names are
    ``block{i}.conv.weight`` … ``head.bias`` so subsets can be chosen by pattern
    (``head.*`` for ANIL-style head-only adaptation).
    """
    params: Params = {}
    channels = in_channels
    for i in range(1, blocks + 1):
        params[f"block{i}.conv.weight"] = _xavier(generator, (width, channels, 3, 3))
        params[f"block{i}.norm.weight"] = torch.ones(width)
        params[f"block{i}.norm.bias"] = torch.zeros(width)
        channels = width
    params["head.weight"] = _xavier(generator, (ways, width))
    params["head.bias"] = torch.zeros(ways)
    return params


def _xavier(generator: torch.Generator, shape: tuple[int, ...]) -> Tensor:
    receptive = math.prod(shape[2:])
    bound = math.sqrt(6.0 / ((shape[0] + shape[1]) * receptive))
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def _norm_relu(x: Tensor, scale: Tensor, shift: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Batch norm on the batch statistics over ``dims``, then ReLU (scale/shift broadcastable)."""
    var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
    gain = scale * torch.rsqrt(var + EPS)
    return torch.relu(x * gain + (shift - mean * gain))


def _block(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, groups: int, downsample: str) -> Tensor:
    stride = 2 if downsample == "stride" else 1
    if groups == 1:  # one task, as in the per-task reference: PyTorch's own derivatives
        x = F.conv2d(x, weight, None, stride=stride, padding=1)
    else:  # tasks as groups: second derivatives without PyTorch's loop over groups
        x = grouped_conv2d(x, weight, stride, 1, groups)
    x = _norm_relu(x, scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1), (0, 2, 3))
    return F.max_pool2d(x, 2) if downsample == "maxpool" else x


def _first_block_as_matmul(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, downsample: str) -> Tensor:
    """The first block of T tasks, its convolution as one batched matrix product (im2col).

    x (T, B, C, H, W), weight (T, filters, C, 3, 3) -> (B, T·filters, H', W'), the grouped
    layout of the later blocks. With 1–3 input channels the im2col copy is only 9·C values per
    pixel, while the grouped convolution's weight gradient and its layout changes took about
    a quarter of a compiled Q = 15 meta-step on CPU (docs/benchmarks.md).
    """
    tasks, batch, channels, image_h, image_w = x.shape
    stride = 2 if downsample == "stride" else 1
    out_h, out_w = (image_h - 1) // stride + 1, (image_w - 1) // stride + 1
    padded = F.pad(x.permute(0, 1, 3, 4, 2), (0, 0, 1, 1, 1, 1))  # (T, B, H+2, W+2, C)
    taps = [padded[:, :, dy:dy + stride * (out_h - 1) + 1:stride, dx:dx + stride * (out_w - 1) + 1:stride]
            for dy in range(3) for dx in range(3)]
    columns = torch.cat(taps, -1).reshape(tasks, batch * out_h * out_w, 9 * channels)
    filters = weight.permute(0, 3, 4, 2, 1).reshape(tasks, 9 * channels, -1)  # rows ordered as the taps
    y = torch.bmm(columns, filters).view(tasks, batch, out_h, out_w, -1)
    y = _norm_relu(y, scale.view(tasks, 1, 1, 1, -1), shift.view(tasks, 1, 1, 1, -1), (1, 2, 3))
    y = y.permute(1, 0, 4, 2, 3).reshape(batch, -1, out_h, out_w)
    return F.max_pool2d(y, 2) if downsample == "maxpool" else y


def _num_blocks(params: Params) -> int:
    return sum(name.endswith(".conv.weight") for name in params)


def conv4_logits(params: Params, x: Tensor, downsample: str = "stride") -> Tensor:
    """Logits of one task's images ``x`` (B, C, H, W)."""
    blocks = _num_blocks(params)
    for i in range(1, blocks + 1):
        x = _block(
            x,
            params[f"block{i}.conv.weight"],
            params[f"block{i}.norm.weight"],
            params[f"block{i}.norm.bias"],
            1,
            downsample,
        )
    return x.mean((2, 3)) @ params["head.weight"].t() + params["head.bias"]


def conv4_logits_grouped(params: Params, x: Tensor, downsample: str = "stride") -> Tensor:
    """Logits of T tasks at once: params (T, ...) and images (T, B, C, H, W) -> (T, B, ways).

    The first block is one batched matrix product over all tasks. In blocks 2 onwards, tasks
    are laid side by side along the channel axis, so one grouped convolution (groups = T)
    applies every task's own filters, and per-channel batch statistics are automatically
    per-task.
    """
    tasks, batch = x.shape[:2]
    x = _first_block_as_matmul(x, params["block1.conv.weight"], params["block1.norm.weight"],
                               params["block1.norm.bias"], downsample)
    for i in range(2, _num_blocks(params) + 1):
        weight = params[f"block{i}.conv.weight"]
        x = _block(
            x,
            weight.reshape(-1, *weight.shape[2:]),
            params[f"block{i}.norm.weight"].reshape(-1),
            params[f"block{i}.norm.bias"].reshape(-1),
            tasks,
            downsample,
        )
    features = x.mean((2, 3)).view(batch, tasks, -1).transpose(0, 1)
    return torch.baddbmm(params["head.bias"].unsqueeze(1), features, params["head.weight"].transpose(1, 2))


def _loss(params: Params, batch: Batch, downsample: str) -> tuple[Tensor, Metrics]:
    images, labels = split_xy(batch)
    return classification_loss(conv4_logits(params, images, downsample), labels)


def _batched_loss(params: Params, batch: Batch, downsample: str) -> tuple[Tensor, Metrics]:
    images, labels = split_xy(batch)
    logits = conv4_logits_grouped(params, images, downsample)
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    accuracy = (logits.argmax(-1) == labels).float().mean(1)
    return losses.view(labels.shape).mean(1), {"accuracy": accuracy}


def make_conv4(
    ways: int, in_channels: int = 1, width: int = 64, blocks: int = 4, downsample: str = "stride"
) -> TaskModel:
    """The conv4 classifier as a TaskModel.

    Raises:
        ValueError: ``downsample`` is not one of ``DOWNSAMPLING``.
    """
    if downsample not in DOWNSAMPLING:
        raise ValueError(f"downsample must be one of {DOWNSAMPLING}, got {downsample!r}")
    return TaskModel(
        name="conv4",
        init=partial(init_conv4, ways=ways, in_channels=in_channels, width=width, blocks=blocks),
        loss=partial(_loss, downsample=downsample),
        batched_loss=partial(_batched_loss, downsample=downsample),
    )
