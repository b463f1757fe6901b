"""How far bf16 autocast moves a meta-gradient, next to how far another meta-batch moves it.

The benchmark's fastest CPU path is compiled bf16; this measures what bf16 costs in accuracy.
For second-order and first-order MAML (Omniglot 5-way 1-shot, meta-batch 32, 1 inner step at
α = 0.4), at Q = 1 and 15, on the initial Φ and on a trained one (a run's final checkpoint):
the cosine between the meta-gradient and its float64 reference for fp32 (compiled), for bf16
(compiled, autocast), and for the float64 meta-gradient of another meta-batch; and bf16's
relative error, whole and per parameter tensor. Medians over ``--batches`` meta-batches.

    python bench/bf16_gradients.py --trained runs/RUN [--batches 3] [--json bench/results/bf16_gradients.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from distmeta.algorithms import InnerLoop, build_algorithm, compiled, compute_contribution
from distmeta.checkpoint import latest_checkpoint, load_checkpoint
from distmeta.data.omniglot import load_omniglot
from distmeta.data.omniglot_tasks import OmniglotTasks
from distmeta.device import precision_context
from distmeta.models import make_conv4
from distmeta.types import Params, TaskBatch

WAYS, META_BATCH, INNER_LR = 5, 32, 0.4


def flat(grads: Params) -> torch.Tensor:
    return torch.cat([g.double().flatten() for g in grads.values()])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trained", required=True, help="a conv4 5-way run directory (its newest checkpoint)")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--json", default="bench/results/bf16_gradients.json")
    args = parser.parse_args()
    data, model = load_omniglot(), make_conv4(WAYS)
    fast = compiled(model.batched_loss)
    cpu = torch.device("cpu")
    phis = {"initial": model.init(torch.Generator().manual_seed(0)),
            "trained": load_checkpoint(latest_checkpoint(Path(args.trained) / "checkpoints"))["phi"]}
    rows = []
    print(f"{'algorithm':<9} {'Q':>2} {'Φ':<8} {'cos fp32':>9} {'cos bf16':>9} {'cos other batch':>16} "
          f"{'bf16 rel err':>13} {'per tensor (median / max)':>26}")
    for name in ("maml", "fomaml"):
        algorithm = build_algorithm(name, InnerLoop(INNER_LR, 1))
        for queries in (1, 15):
            sampler = OmniglotTasks(data, ways=WAYS, shots=1, queries=queries)
            for which, phi in phis.items():
                phi64 = {n: p.double() for n, p in phi.items()}
                measured = []
                for step in range(args.batches):
                    tasks = sampler.sample("train", step, 0, META_BATCH)
                    tasks64 = TaskBatch(*((x.double(), y) for x, y in tasks))
                    other64 = TaskBatch(*((x.double(), y) for x, y in sampler.sample("train", 1000 + step, 0, META_BATCH)))
                    reference = compute_contribution(algorithm, model, phi64, tasks64, "batched").grad_sum
                    fp32 = compute_contribution(algorithm, model, phi, tasks, "batched", fast).grad_sum
                    with precision_context("bf16", cpu):
                        bf16 = compute_contribution(algorithm, model, phi, tasks, "batched", fast).grad_sum
                    other = compute_contribution(algorithm, model, phi64, other64, "batched").grad_sum
                    per_tensor = [float((bf16[n].double() - g).norm() / g.norm()) for n, g in reference.items()]
                    measured.append({
                        "cos_fp32": cosine(flat(fp32), flat(reference)), "cos_bf16": cosine(flat(bf16), flat(reference)),
                        "cos_other_batch": cosine(flat(other), flat(reference)),
                        "bf16_rel_err": float((flat(bf16) - flat(reference)).norm() / flat(reference).norm()),
                        "bf16_rel_err_tensor_median": statistics.median(per_tensor), "bf16_rel_err_tensor_max": max(per_tensor)})
                row = {"algorithm": name, "queries": queries, "phi": which,
                       **{k: statistics.median(m[k] for m in measured) for k in measured[0]}}
                rows.append(row)
                print(f"{name:<9} {queries:>2} {which:<8} {row['cos_fp32']:>9.6f} {row['cos_bf16']:>9.4f} "
                      f"{row['cos_other_batch']:>16.3f} {row['bf16_rel_err']:>13.3f} "
                      f"{row['bf16_rel_err_tensor_median']:>13.3f} / {row['bf16_rel_err_tensor_max']:.3f}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"torch": torch.__version__, "trained": args.trained,
                                           "meta_batch": META_BATCH, "batches": args.batches, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
