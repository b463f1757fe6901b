"""Meta-training throughput: distmeta's paths against the anchors, on the same Omniglot tasks.

Omniglot 5-way 1-shot, meta-batch 32, conv4 (64 filters), 1 inner step at α = 0.4, with 1 and
with 15 query examples per class. One iteration = meta-gradient of the 32 tasks + Adam step.
Methods are timed round-robin (one iteration of each per round) so that machine noise hits
them alike; the table shows the median over rounds, and each method's speed-up over
learn2learn as the median of its per-round ratios (a slow phase of the machine cancels out of
those). Anchors (learn2learn, TorchOpt, higher) are timed where they import
(bench/install_anchors.sh). The script restarts itself once with
glibc's allocator settings of the ``distmeta`` command (``distmeta.device.ALLOCATOR_ENV``), so
the anchors run with them too.

    python bench/meta_step.py [--queries 1 15] [--algorithms maml fomaml reptile] [--rounds 7]
                              [--methods "compile bf16" learn2learn]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distmeta.algorithms import InnerLoop, build_algorithm, compiled, compute_contribution  # noqa: E402
from distmeta.data.omniglot import load_omniglot  # noqa: E402
from distmeta.data.omniglot_tasks import OmniglotTasks  # noqa: E402
from distmeta.device import (  # noqa: E402
    precision_context,
    restart_with_allocator_env,  # noqa: E402
    to_device,
)
from distmeta.models import make_conv4  # noqa: E402
from distmeta.optim import adam  # noqa: E402
from distmeta.types import TaskBatch  # noqa: E402

WAYS, SHOTS, META_BATCH, INNER_LR = 5, 1, 32, 0.4


def ours(algorithm: str, path: str, precision: str, compile: bool, device: torch.device) -> Callable[[TaskBatch], float]:
    model = make_conv4(WAYS)
    fast = compiled(model.batched_loss) if compile else None
    alg = build_algorithm(algorithm, InnerLoop(INNER_LR, 1))
    phi = {n: p.to(device) for n, p in model.init(torch.Generator().manual_seed(0)).items()}
    optimizer = adam(1e-3)
    state = {"phi": phi, "opt": optimizer.init(phi)}

    def iteration(tasks: TaskBatch) -> float:
        with precision_context(precision, device):
            c = compute_contribution(alg, model, state["phi"], tasks, path, fast)
        grads = {n: g / c.num_tasks for n, g in c.grad_sum.items()}
        state["phi"], state["opt"] = optimizer.update(state["phi"], grads, state["opt"])
        return c.metrics["loss"].item() / c.num_tasks

    return iteration


def anchor(name: str, algorithm: str, device: torch.device) -> Callable[[TaskBatch], float]:
    from anchors import make_anchor

    step = make_anchor(name, n_way=WAYS, inner_lr=INNER_LR, inner_steps=1, first_order=algorithm == "fomaml")
    step.model.to(device)  # in place: the anchor's optimizer keeps the same parameters
    return lambda tasks: step(tasks.support[0], tasks.support[1], tasks.query[0], tasks.query[1])


def methods(algorithm: str, device: torch.device, with_anchors: bool, keep: list[str]) -> dict[str, Callable]:
    """The methods to time, those whose name contains one of ``keep`` (all when empty)."""
    def kept(name: str) -> bool:
        return not keep or any(k in name for k in keep)

    variants = (("batched", "fp32", False), ("batched", "fp32", True), ("batched", "bf16", True), ("vmap", "fp32", False),
                ("loop", "fp32", False))
    found = {}
    for path, precision, compile in variants:
        name = f"distmeta {path}{'+compile' if compile else ''} {precision}"
        if kept(name):
            found[name] = ours(algorithm, path, precision, compile, device)
    if with_anchors and algorithm in ("maml", "fomaml"):
        try:
            from anchors import available_anchors
        except ImportError:
            available_anchors = lambda: []  # noqa: E731
        for name in filter(kept, available_anchors()):
            found[name] = anchor(name, algorithm, device)
    if not found:
        raise SystemExit(f"--methods {keep} matches no method of {algorithm}")
    return found


def add_round_ratios(timings: dict, anchor_name: str = "learn2learn") -> None:
    """Each method's speed-up over the anchor as the median of per-round ratios: a round runs
    every method once in turn, so a slow phase of the machine cancels out of its ratio."""
    if anchor_name not in timings:
        return
    reference = timings[anchor_name]["all_s"]
    for t in timings.values():
        t[f"vs_{anchor_name}"] = statistics.median(a / s for a, s in zip(reference, t["all_s"]))


def measure(candidates: dict[str, Callable], tasks: list[TaskBatch], rounds: int, device: torch.device) -> dict:
    for run in candidates.values():  # warm-up (allocator, oneDNN / cuDNN kernel choice)
        run(tasks[0])
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    for r in range(rounds):
        for name, run in candidates.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run(tasks[r % len(tasks)])
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(s), "it_per_s": 1 / statistics.median(s),
                   "tasks_per_s": META_BATCH / statistics.median(s), "all_s": s} for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 15])
    parser.add_argument("--algorithms", nargs="+", default=["maml", "fomaml", "reptile"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-anchors", action="store_true")
    parser.add_argument("--methods", nargs="+", default=[],
                        help="time only methods whose name contains one of these (keep learn2learn for the x l2l column)")
    parser.add_argument("--json", default="bench/results/meta_step.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_omniglot()
    results = {"command": " ".join(["python"] + sys.argv), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
               "meta_batch": META_BATCH, "rounds": args.rounds, "runs": []}
    print(f"torch {torch.__version__}, {results['threads']} threads, {results['device']}")
    print(f"{'algorithm':<9} {'Q':>3} {'method':<26} {'it/s':>7} {'tasks/s':>8} {'x l2l':>7}")
    for queries in args.queries:
        sampler = OmniglotTasks(data, ways=WAYS, shots=SHOTS, queries=queries)
        tasks = [to_device(sampler.sample("train", step, 0, META_BATCH), device) for step in range(3)]
        for algorithm in args.algorithms:
            # torch.compile wraps every partial in one shared frame, whose recompile limit (8)
            # this many compiled methods would exhaust, silently leaving the later ones eager
            torch._dynamo.reset()
            timings = measure(methods(algorithm, device, not args.no_anchors, args.methods), tasks, args.rounds, device)
            add_round_ratios(timings)
            for name, t in timings.items():
                ratio = f"{t['vs_learn2learn']:>6.2f}x" if "vs_learn2learn" in t else ""
                print(f"{algorithm:<9} {queries:>3} {name:<26} {t['it_per_s']:>7.2f} {t['tasks_per_s']:>8.1f} {ratio}")
                results["runs"].append({"algorithm": algorithm, "queries": queries, "method": name, **t})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    restart_with_allocator_env()  # as the distmeta command runs
    main()
