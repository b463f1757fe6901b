"""Shared fixtures: real data from ../shared (never copied into the repo), tiny models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"


@pytest.fixture(scope="session")
def omniglot_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Point the loader at the shared Omniglot copy and a cache that lives for the session."""
    if not SHARED_OMNIGLOT.is_dir():
        pytest.skip(f"real Omniglot not found at {SHARED_OMNIGLOT}")
    cache = os.environ.get("DISTMETA_TEST_CACHE") or str(tmp_path_factory.mktemp("distmeta-cache"))
    env = {"DISTMETA_OMNIGLOT": str(SHARED_OMNIGLOT), "DISTMETA_CACHE": cache}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def float64():
    """Run a test in float64 so that finite differences and path comparisons are exact enough."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
