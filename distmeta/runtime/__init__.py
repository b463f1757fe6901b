"""Where steps run: in this process (``local``) or on Ray actors (``ray_runtime``), both
applying contributions through the same ``ParameterStore``."""
from distmeta.runtime.local import LocalExecutor, LocalRuntime, Rewound, Runtime

__all__ = ["LocalExecutor", "LocalRuntime", "Rewound", "Runtime"]
