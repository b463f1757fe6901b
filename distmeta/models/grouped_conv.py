"""A grouped convolution whose second derivatives are whole grouped convolutions.

PyTorch's derivative of ``convolution_backward`` (``_convolution_double_backward``) computes
the weight term one group at a time for grouped convolutions: with 32 tasks as 32 groups,
second-order MAML's pass through the support gradient ran ~100 small convolutions per step,
plus a slice and a copy for each. Both derivatives of a convolution are convolutions again,
so here the backward is itself an autograd Function whose backward makes at most four
grouped-convolution calls per layer, whatever the number of groups. The result is the same
as ``F.conv2d`` (gradcheck and gradgradcheck in tests/test_algorithms.py); with one group
(the per-task reference, vmap, one-task slices) conv4 keeps ``F.conv2d``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_convolution_backward = torch.ops.aten.convolution_backward.default


def grouped_conv2d(x: Tensor, weight: Tensor, stride: int, padding: int, groups: int) -> Tensor:
    """``F.conv2d(x, weight, None, stride, padding, 1, groups)`` with a fast double backward.

    Under autocast the inputs are cast here as ``F.conv2d`` would cast them (float64 is left
    alone), because the saved tensors feed ``convolution_backward``, which autocast does not
    cover.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight = [t if t.dtype == torch.float64 else t.to(dtype) for t in (x, weight)]
        with torch.autocast(device, enabled=False):
            return _GroupedConv.apply(x, weight, stride, padding, groups)
    return _GroupedConv.apply(x, weight, stride, padding, groups)


def _conv(x: Tensor, weight: Tensor, geometry: tuple[int, int, int]) -> Tensor:
    stride, padding, groups = geometry
    return F.conv2d(x, weight, None, stride, padding, 1, groups)


def _backward(grad_out: Tensor, x: Tensor, weight: Tensor, geometry: tuple[int, int, int],
              mask: list[bool]) -> tuple[Tensor | None, Tensor | None]:
    """(input gradient, weight gradient) of ``conv(x, weight)`` for ``grad_out``, as ``mask`` asks."""
    stride, padding, groups = geometry
    grad_x, grad_w, _ = _convolution_backward(grad_out, x, weight, None, [stride] * 2, [padding] * 2, [1, 1],
                                              False, [0, 0], groups, [*mask, False])
    return grad_x, grad_w


class _GroupedConv(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, weight: Tensor, stride: int, padding: int, groups: int) -> Tensor:
        return _conv(x, weight, (stride, padding, groups))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, *geometry = inputs
        ctx.geometry = tuple(geometry)
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        grad_x, grad_w = _GroupedConvBackward.apply(grad_out, x, weight, ctx.geometry,
                                                    tuple(ctx.needs_input_grad[:2]))
        return grad_x, grad_w, None, None, None


class _GroupedConvBackward(torch.autograd.Function):
    """(grad_out, x, weight) -> (input gradient, weight gradient); both are bilinear, so their
    derivatives for incoming (gg_x, gg_w) are:
    grad_out: conv(gg_x, weight) + conv(x, gg_w); weight: the weight gradient of conv(gg_x, ·)
    for grad_out; x: the input gradient of conv(·, gg_w) for grad_out."""

    @staticmethod
    def forward(grad_out: Tensor, x: Tensor, weight: Tensor, geometry: tuple[int, int, int],
                mask: tuple[bool, bool]) -> tuple[Tensor | None, Tensor | None]:
        return _backward(grad_out, x, weight, geometry, list(mask))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        grad_out, x, weight, ctx.geometry, _ = inputs
        ctx.save_for_backward(grad_out, x, weight)
        ctx.set_materialize_grads(False)  # an unused gradient arrives as None, not as zeros to convolve

    @staticmethod
    def backward(ctx: Any, gg_x: Tensor | None, gg_w: Tensor | None) -> tuple:
        grad_out, x, weight = ctx.saved_tensors
        need_grad_out, need_x, need_w = ctx.needs_input_grad[:3]
        terms, grad_x, grad_w = [], None, None
        if gg_x is not None:
            if need_grad_out:
                terms.append(_conv(gg_x, weight, ctx.geometry))
            if need_w:
                grad_w = _backward(grad_out, gg_x, weight, ctx.geometry, [False, True])[1]
        if gg_w is not None:
            if need_grad_out:
                terms.append(_conv(x, gg_w, ctx.geometry))
            if need_x:
                grad_x = _backward(grad_out, x, gg_w, ctx.geometry, [True, False])[0]
        return sum(terms[1:], terms[0]) if terms else None, grad_x, grad_w, None, None
