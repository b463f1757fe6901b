"""Models as pure functions over named parameter dicts; they know nothing of tasks or Ray."""

from distmeta.models.base import TaskModel, vmapped
from distmeta.models.conv4 import make_conv4
from distmeta.models.mlp import make_mlp

__all__ = ["TaskModel", "make_conv4", "make_mlp", "vmapped"]
