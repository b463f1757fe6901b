"""Models as pure functions over named parameter dicts; they know nothing of tasks or Ray."""

from distmeta.models.base import TaskModel, vmapped
from distmeta.models.conv4 import conv4
from distmeta.models.mlp import mlp

__all__ = ["TaskModel", "conv4", "mlp", "vmapped"]
