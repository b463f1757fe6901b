"""A real multi-node Ray cluster on this machine, started the way users start one: ``ray start``.

Why not ``ray.cluster_utils.Cluster``: with the head on 127.0.0.1 it hung waiting for the GCS on
this kind of machine, and it is not what a user runs. Token authentication stays on, as on a real
cluster: all nodes and clients share one token (``$RAY_AUTH_TOKEN``; HTTP clients send it as a
bearer header). Every port is picked free and the session lives in its own ``--temp-dir``, so a
parallel or leftover cluster never collides with this one and its logs stay apart.

"On loopback" only in part: Ray 2.60 replaces ``--node-ip-address=127.0.0.1`` (and 127.0.0.1 in
``--address``) by the host's routable IP, and the GCS and raylets listen on all interfaces; only
the dashboard is bound to 127.0.0.1. The token is what keeps others out.

Ending it: each ``ray start`` runs in a session of its own (``setsid``), so every process it spawns
(GCS, raylet, dashboard and its modules, agents, log monitors, client server) carries that session
id; workers and job drivers that Ray starts later descend from those. :meth:`LocalRayCluster.stop`
signals exactly these PIDs (SIGTERM, then SIGKILL) and checks that none is left. Never by name:
``ray stop`` or ``pkill`` would also end Ray instances that are not ours. Linux only (``/proc``).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
# A session's sockets live at <temp dir>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store.N,
# and AF_UNIX paths end at 107 bytes: about 60 of them are Ray's, so the temp dir gets the rest.
MAX_TEMP_DIR_CHARS = 40

Identity = tuple[int, int]  # (pid, start time in clock ticks): a PID the kernel reused is another process


def free_port() -> int:
    """A TCP port that nothing listens on now (the kernel's pick; Ray binds it moments later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def short_temp_dir(base: Path) -> tuple[Path, bool]:
    """``base`` if its path is short enough for Ray's socket paths, else a new short dir in /tmp.

    Returns the dir and whether the caller created it (and so must remove it).
    """
    if len(str(base)) <= MAX_TEMP_DIR_CHARS:
        return base, False
    return Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp")), True


def _processes() -> dict[int, tuple[str, int, int, int]]:
    """Every process now: pid -> (state, parent pid, session id, start time)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
        except OSError:  # ended meanwhile
            continue
        table[int(entry)] = (fields[0], int(fields[1]), int(fields[3]), int(fields[19]))
    return table


def alive(identities: set[Identity]) -> set[Identity]:
    """Those of ``identities`` still running (a zombie has ended; a reused PID is someone else)."""
    table = _processes()
    return {(pid, start) for pid, start in identities
            if pid in table and table[pid][3] == start and table[pid][0] != "Z"}


def process_tree(root: int) -> set[Identity]:
    """``root`` and all its descendants now (e.g. a driver and the local Ray it started)."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid in table and (pid, table[pid][3]) not in found:
            found.add((pid, table[pid][3]))
            stack.extend(children.get(pid, []))
    return found


def kill(identities: set[Identity], timeout_s: float = 10.0) -> None:
    """SIGKILL exactly these processes (a hard crash) and wait until none is left.

    Raises:
        RuntimeError: some are still running after ``timeout_s``.
    """
    for pid, _ in alive(identities):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while alive(identities) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(identities):
        raise RuntimeError(f"still running after SIGKILL: {sorted(pid for pid, _ in alive(identities))}")


class LocalRayCluster:
    """A head node without CPUs (it runs the GCS, the dashboard and job drivers) and ``workers``
    worker nodes of ``cpus_per_worker`` CPUs, all ``ray start``-ed from this venv on this machine.

    Use as a context manager; it stops the cluster on exit, and on a failed start.
    """

    def __init__(self, temp_dir: Path, workers: int = 2, cpus_per_worker: int = 1,
                 start_timeout_s: float = 120.0) -> None:
        self.temp_dir, self._remove_temp_dir = short_temp_dir(temp_dir)
        self.workers, self.cpus_per_worker, self.start_timeout_s = workers, cpus_per_worker, start_timeout_s
        self.token = secrets.token_hex(32)
        self.port, self.dashboard_port = free_port(), free_port()
        # The nodes pass their environment on to workers and job drivers: the token, and the
        # venv's bin first on PATH so that a job's `distmeta` entrypoint resolves to this venv.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "PATH": os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")])}
        self.env.pop("RAY_ADDRESS", None)
        self.sessions: set[int] = set()  # per `ray start` its PID, which its children inherit as session id
        self.processes: set[Identity] = set()

    @property
    def address(self) -> str:
        """The GCS address, for ``ray start --address`` and ``ray.init``."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard (Jobs API, state API) address."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def headers(self) -> dict[str, str]:
        """What an HTTP client of the dashboard sends to authenticate."""
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def logs_dir(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Starts the head, then the worker nodes, and waits until all nodes are alive."""
        self._ray_start("head", "--head", f"--port={self.port}", "--num-cpus=0",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                        f"--ray-client-server-port={free_port()}", f"--temp-dir={self.temp_dir}",
                        "--disable-usage-stats")
        for _ in range(self.workers):
            self.add_worker(self.cpus_per_worker)
        self.wait_for_nodes(1 + self.workers)

    def add_worker(self, cpus: int) -> None:
        """Starts one more worker node of ``cpus`` CPUs (what an autoscaler does); it is stopped
        with the others."""
        self._ray_start(f"worker{len(self.sessions)}", f"--address={self.address}", f"--num-cpus={cpus}")

    def _ray_start(self, name: str, *args: str) -> None:
        # The dashboard agent's HTTP port defaults to 52365 on every node: pick one per node.
        command = [str(RAY), "start", "--node-ip-address=127.0.0.1",
                   f"--dashboard-agent-listen-port={free_port()}", *args]
        # Output to a file, not a pipe that a daemon could inherit and hold open.
        log = self.temp_dir / f"ray-start-{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.sessions.add(proc.pid)
        try:
            returncode = proc.wait(timeout=self.start_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            returncode = None
        finally:
            self.record()
        if returncode != 0:
            ended = "timed out" if returncode is None else f"exited {returncode}"
            raise RuntimeError(f"`{' '.join(command)}` {ended}:\n{log.read_text()[-4000:]}\n"
                               f"(Ray's logs: {self.logs_dir})")

    def record(self) -> set[Identity]:
        """Adds to :attr:`processes` every process of this cluster now: members of a ``ray start``
        session, and descendants of those (workers; job drivers, which Ray puts in new sessions)."""
        table = _processes()
        mine = {pid for pid, (_, _, sid, _) in table.items() if sid in self.sessions}
        mine |= {pid for pid, start in self.processes if pid in table and table[pid][3] == start}
        children: dict[int, list[int]] = {}
        for pid, (_, ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        stack = list(mine)
        while stack:
            for child in children.get(stack.pop(), []):
                if child not in mine:
                    mine.add(child)
                    stack.append(child)
        self.processes |= {(pid, table[pid][3]) for pid in mine}
        return self.processes

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM to every recorded process, SIGKILL to those left after ``grace_s``.

        Most end at once; raylets take ~10 s and the GCS and autoscaler monitor outlast 12 s
        (``ray stop`` waits 16 s). A test cluster's state is worth nothing, so 5 s is enough.

        Raises:
            RuntimeError: some recorded process still runs after SIGKILL.
        """
        self.record()
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            for pid, _ in alive(self.processes):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while alive(self.processes) and time.monotonic() < deadline:
                time.sleep(0.1)
        left = alive(self.processes)
        if left:
            raise RuntimeError(f"Ray processes still running after SIGKILL: {sorted(pid for pid, _ in left)}")
        if self._remove_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def get(self, path: str, timeout_s: float = 5.0) -> Any:
        """GET ``path`` from the dashboard's REST API, authenticated; the decoded JSON."""
        request = urllib.request.Request(self.dashboard_url + path, headers=self.headers)
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.load(response)

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's nodes as the state API lists them (``node_id``, ``is_head_node``, ``state``)."""
        return self.get("/api/v0/nodes?limit=1000")["data"]["result"]["result"]

    def wait_for_nodes(self, count: int, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Waits until ``count`` nodes are ALIVE; returns them.

        Raises:
            TimeoutError: fewer are alive after ``timeout_s`` (the message says what was seen).
        """
        deadline, seen = time.monotonic() + timeout_s, "no answer yet"
        while time.monotonic() < deadline:
            try:
                live = [n for n in self.nodes() if n["state"] == "ALIVE"]
                if len(live) >= count:
                    return live
                seen = f"{len(live)} alive: {live}"
            except (urllib.error.URLError, OSError, KeyError, ValueError) as error:
                seen = repr(error)
            time.sleep(0.5)
        raise TimeoutError(f"{count} Ray nodes not alive after {timeout_s:g} s at {self.dashboard_url} "
                           f"(last: {seen}); Ray's logs: {self.logs_dir}")

    def job_client(self) -> JobSubmissionClient:
        """A Ray Jobs client of this cluster, authenticated with its token.

        The token goes in an explicit header. Without one the client sends a token only where
        this process's Ray config says ``RAY_AUTH_MODE=token``, read once, at the first use of
        Ray in the process: setting ``$RAY_AUTH_MODE``/``$RAY_AUTH_TOKEN`` later does nothing,
        and a token alone, without the mode, is not sent either.
        """
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers=self.headers)
