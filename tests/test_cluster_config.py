"""cluster.yaml: valid for `ray up` and shaped the way distmeta needs. Offline, no AWS.

Ray's schema and defaults come from the same two steps that `ray up` runs before it first
calls AWS (``prepare_config``, then ``validate_config`` from ``ray.autoscaler._private.util``).
Our own requirements are written as ``problems(config)``, and the negative tests check that
each requirement can actually fail.
"""
from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
DASHBOARD_PORT = 8265  # what docs/cluster.md tunnels and `ray job submit --address` uses

Config = dict[str, Any]


def load_cluster(path: Path = CLUSTER_YAML) -> Config:
    return yaml.safe_load(path.read_text())


def prepare(raw: Config) -> Config:
    """Ray's defaults merged in and the result checked against Ray's schema, as `ray up` does."""
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def flag(command: str, name: str) -> str | None:
    """Value of ``--name=value`` or ``--name value`` in a shell command, else None."""
    match = re.search(rf"--{re.escape(name)}(?:=|\s+)(\S+)", command)
    return match.group(1) if match else None


def ray_start_commands(config: Config, kind: str) -> list[str]:
    return [c for c in config[f"{kind}_start_ray_commands"] if "ray start" in c]


def env_assignment(command: str, name: str) -> str | None:
    """Value given to ``name`` on the command line (``NAME=value cmd`` or ``export NAME=value``)."""
    for word in shlex.split(command.replace(";", " ; ")):
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
    return None


def mounted(config: Config, remote: str) -> bool:
    """Whether a remote path lies inside one of the file_mounts' remote paths."""
    remote = remote.replace("$HOME/", "~/")
    return any(remote == m or remote.startswith(m.rstrip("/") + "/") for m in config["file_mounts"])


def image_version(image: str) -> tuple[str, str] | None:
    """(Ray version, Python tag) of a rayproject image such as ``rayproject/ray:2.60.0-py311-gpu``."""
    match = re.fullmatch(r".*:(\d+\.\d+\.\d+)-(py\d+)(?:-.+)?", image)
    return (match.group(1), match.group(2)) if match else None


def gpu_worker_types(config: Config) -> dict[str, Config]:
    return {name: t for name, t in config["available_node_types"].items()
            if name != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1}


def setup_problems(config: Config, kind: str, torch_index: str) -> list[str]:
    commands = config[f"{kind}_setup_commands"]  # prepare_config put setup_commands in front
    distmeta = [i for i, c in enumerate(commands) if re.search(r"pip install .*-e\s+~/distmeta(\s|$)", c)]
    torch = [i for i, c in enumerate(commands) if re.search(r"pip install .*torch==", c)]
    if not distmeta:
        return [f"{kind}: no `pip install -e ~/distmeta` in its setup commands"]
    problems = []
    if not torch or torch[0] > distmeta[0]:
        problems.append(f"{kind}: torch must be installed before distmeta (else pip picks PyPI's build)")
    elif not re.search(torch_index, commands[torch[0]]):
        problems.append(f"{kind}: torch should come from {torch_index}: {commands[torch[0]]}")
    if f"ray[default,train,tune]=={ray.__version__}" not in commands[distmeta[0]]:
        problems.append(f"{kind}: distmeta's install should pin ray=={ray.__version__} (the image's)")
    return problems


def problems(config: Config) -> list[str]:
    """What distmeta needs from a prepared cluster config, one line per unmet need."""
    out = []
    types, head = config["available_node_types"], config["head_node_type"]
    if types[head]["resources"].get("GPU", 0) != 0:
        out.append("head node type must have no GPU (it runs the driver and parameter server)")
    workers = gpu_worker_types(config)
    if not workers:
        out.append("no worker node type with a GPU")
    for name, t in workers.items():
        if not 0 == t["min_workers"] < t["max_workers"] <= config["max_workers"]:
            out.append(f"{name}: need min_workers 0 < max_workers <= global max_workers")

    # Setup: the repo is mounted and installed on every node, torch from the matching index.
    repo = config["file_mounts"].get("~/distmeta")
    if repo is None or not (REPO / repo / "pyproject.toml").is_file():
        out.append("file_mounts must mount the repository (local '.') at ~/distmeta")
    out += setup_problems(config, "head", r"download\.pytorch\.org/whl/cpu\b")
    out += setup_problems(config, "worker", r"download\.pytorch\.org/whl/cu\d+\b")

    # Token auth on every node, the token read from a mounted file, never inlined.
    starts = {kind: ray_start_commands(config, kind) for kind in ("head", "worker")}
    for kind, commands in starts.items():
        if len(commands) != 1:
            out.append(f"{kind}: expected one `ray start` command, found {len(commands)}")
            continue
        if env_assignment(commands[0], "RAY_AUTH_MODE") != "token":
            out.append(f"{kind}: `ray start` must run with RAY_AUTH_MODE=token")
        token_path = env_assignment(commands[0], "RAY_AUTH_TOKEN_PATH")
        if not token_path or not mounted(config, token_path):
            out.append(f"{kind}: RAY_AUTH_TOKEN_PATH must name a file inside a file_mounts path")
    everything = " ".join(str(c) for key, cs in config.items() if key.endswith("_commands") for c in cs)
    if "RAY_AUTH_TOKEN=" in everything or "RAY_AUTH_MODE=disabled" in everything:
        out.append("commands must not inline a token or disable auth")

    # Ports: workers join the head's GCS port; the dashboard stays on the head's loopback.
    if all(len(c) == 1 for c in starts.values()):
        head_start, worker_start = starts["head"][0], starts["worker"][0]
        if flag(head_start, "port") != (flag(worker_start, "address") or "").rsplit(":", 1)[-1]:
            out.append("worker --address port must equal the head's --port (GCS)")
        if flag(head_start, "object-manager-port") != flag(worker_start, "object-manager-port"):
            out.append("head and workers should fix the same --object-manager-port")
        if flag(head_start, "dashboard-port") != str(DASHBOARD_PORT):
            out.append(f"head --dashboard-port must be {DASHBOARD_PORT} (what the docs tunnel)")
        if flag(head_start, "dashboard-host") not in ("127.0.0.1", "localhost"):
            out.append("dashboard must bind to the head's loopback (reach it via `ray dashboard`)")

    # One Ray and Python version everywhere, equal to the client's Ray.
    docker = config.get("docker", {})
    images = {k: docker.get(k, docker.get("image", "")) for k in ("head_image", "worker_image")}
    versions = {image_version(i) for i in images.values()}
    if len(versions) != 1 or None in versions or next(iter(versions))[0] != ray.__version__:
        out.append(f"docker images must share one Ray {ray.__version__} and Python tag: {images}")
    return out


@pytest.fixture(scope="module")
def raw() -> Config:
    return load_cluster()


@pytest.fixture(scope="module")
def prepared(raw: Config) -> Config:
    return prepare(raw)


def test_ray_accepts_the_cluster_config(prepared: Config):
    assert prepared["cluster_name"] == "distmeta"
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"]


def test_the_cluster_has_what_distmeta_needs(prepared: Config):
    assert problems(prepared) == []


def test_no_secret_is_written_in_the_file():
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"\b[0-9a-fA-F]{32,}\b", text), "looks like a token (ray's are 64 hex digits)"
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "looks like an AWS access key"


def _node(name: str, **changes: Any) -> Callable[[Config], None]:
    return lambda config: config["available_node_types"][name].update(changes)


def _resources(name: str, **changes: Any) -> Callable[[Config], None]:
    return lambda config: config["available_node_types"][name]["resources"].update(changes)


def _replace_in(key: str, old: str, new: str) -> Callable[[Config], None]:
    def mutate(config: Config) -> None:
        config[key] = [c.replace(old, new) for c in config[key]]
    return mutate


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda c: c.update(max_worker=8), id="unknown-top-level-key"),
    pytest.param(_node("worker.gpu", max_workers="8"), id="max_workers-string"),
    pytest.param(_resources("worker.gpu", GPU=0.5), id="fractional-node-gpu"),
    pytest.param(_node("worker.gpu", worker_start_ray_commands=[]), id="unknown-node-type-key"),
])
def test_ray_rejects_a_broken_copy(raw: Config, mutate: Callable[[Config], None]):
    broken = copy.deepcopy(raw)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        prepare(broken)


def test_ray_rejects_a_head_type_that_does_not_exist(raw: Config):
    broken = copy.deepcopy(raw)
    broken["head_node_type"] = "head.gpu"
    with pytest.raises(ValueError, match="head_node_type"):
        prepare(broken)


def _rotate_head_setup(config: Config) -> None:
    commands = config["head_setup_commands"]
    config["head_setup_commands"] = commands[1:] + commands[:1]


@pytest.mark.parametrize("mutate, expected", [
    (_resources("head.cpu", GPU=1), "head node type must have no GPU"),
    (lambda c: c["available_node_types"]["worker.gpu"]["resources"].pop("GPU"),
     "no worker node type with a GPU"),
    (_node("worker.gpu", min_workers=2), "min_workers 0 < max_workers"),
    (lambda c: c.update(max_workers=4), "max_workers <= global max_workers"),
    (lambda c: c["file_mounts"].pop("~/distmeta"), "must mount the repository"),
    (_replace_in("worker_setup_commands", "-e ~/distmeta", "distmeta"),
     "worker: no `pip install -e ~/distmeta`"),
    (_replace_in("worker_setup_commands", "whl/cu130", "whl/cpu"), "worker: torch should come from"),
    (_rotate_head_setup, "head: torch must be installed before distmeta"),
    (_replace_in("worker_setup_commands", f"=={ray.__version__}", ""),
     "worker: distmeta's install should pin ray"),
    (_replace_in("worker_start_ray_commands", "RAY_AUTH_MODE=token", ""),
     "worker: `ray start` must run with"),
    (_replace_in("head_start_ray_commands", "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"),
     "head: `ray start`"),
    (_replace_in("head_start_ray_commands", "$HOME/ray-auth/", "/etc/"), "head: RAY_AUTH_TOKEN_PATH"),
    (_replace_in("setup_commands", "grep -q", "RAY_AUTH_TOKEN=abc grep -q"), "must not inline a token"),
    (_replace_in("worker_start_ray_commands", ":6379", ":6380"), "worker --address port"),
    (_replace_in("worker_start_ray_commands", "=8076", "=8077"), "same --object-manager-port"),
    (_replace_in("head_start_ray_commands", "-port=8265", "-port=8266"), "--dashboard-port"),
    (_replace_in("head_start_ray_commands", "-host=127.0.0.1", "-host=0.0.0.0"), "dashboard must bind"),
    (lambda c: c["docker"].update(worker_image="rayproject/ray:2.59.0-py311-gpu"),
     "docker images must share"),
])
def test_each_requirement_can_fail(raw: Config, mutate: Callable[[Config], None], expected: str):
    broken = copy.deepcopy(raw)
    mutate(broken)
    found = problems(prepare(broken))
    assert any(expected in p for p in found), found
