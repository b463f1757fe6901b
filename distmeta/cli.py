"""``distmeta`` command line: train, eval, toy, validate."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from distmeta.config import ConfigError, apply_overrides, job_from_dict, job_to_dict, load_job, load_run_job
from distmeta.data.omniglot import DataError
from distmeta.device import restart_with_allocator_env
from distmeta.storage import Location
from distmeta.types import NonFiniteError


def _train(args: argparse.Namespace) -> int:
    from distmeta.train import train

    overrides = [*args.set, *[f"runtime.workers={args.workers}"] * (args.workers is not None),
                 *[f"runtime.address={args.address}"] * (args.address is not None)]
    if args.resume:
        if args.job or args.out:
            raise ConfigError(["--resume RUN_DIR continues that run with its own config.json: "
                               "give no job file and no --out"], "train")
        job = job_from_dict(apply_overrides(job_to_dict(load_run_job(args.resume)), overrides), args.resume)
        summary = train(job, args.resume, resume=True)
    elif args.job:
        summary = train(load_job(args.job, overrides), args.out)
    else:
        raise ConfigError(["give a job file, or --resume RUN_DIR"], "train")
    print(json.dumps(summary, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from distmeta.evaluate import evaluate_run

    report = evaluate_run(args.run_dir, args.tasks, args.steps, args.split, args.round)
    name = f"eval_{report['split']}_{report['steps']}steps_round{report['round']}.json"
    (Location(args.run_dir) / name).write_bytes(json.dumps(report, indent=2).encode())
    if args.json:
        print(json.dumps(report))
    else:
        name = report["metric"]
        print(f"{report['split']} {name} after {report['steps']} steps on {report['tasks']} tasks: "
              f"{report[name]:.4f} ± {report['ci95']:.4f} (95% CI)")
    return 0


def _toy(args: argparse.Namespace) -> int:
    from distmeta.toy import run_toy

    run_toy(args.out or time.strftime("runs/toy-%Y%m%d-%H%M%S"), steps=args.steps, seed=args.seed)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from distmeta.sweep import load_sweep, sweep

    spec, base = load_sweep(args.sweep)
    summary = sweep(spec, base, args.out or Path("runs") / spec.name, args.resume, args.address)
    best = summary["best_test"]
    print(f"sweep {spec.name}: {summary['trials']} trials, {summary['stopped_early']} stopped early; best "
          f"{summary['best_config']} with {spec.metric} {summary[f'best_{spec.metric}']:.4g}; on "
          f"{best['tasks']} meta-test tasks {best['metric']} {best[best['metric']]:.4f} ± {best['ci95']:.4f} (95% CI)")
    print(json.dumps(summary, indent=2))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from distmeta.compare.pipeline import compare

    folder = compare(args.compare, args.out, args.stage, args.address, args.set)
    if (folder / "report.md").exists() and args.stage in ("all", "report"):
        print((folder / "report.md").read_text())
    print(f"comparison in {folder}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    failed = 0
    from distmeta.compare.config import is_compare_file, load_compare
    from distmeta.sweep import is_sweep_file, load_sweep

    for path in args.jobs:
        try:
            if is_sweep_file(path):
                load_sweep(path)
            elif is_compare_file(path):
                load_compare(path, args.set)
            else:
                load_job(path, args.set)
            print(f"{path}: ok")
        except (ConfigError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            failed += 1
    return 2 if failed else 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="distmeta", description="Meta-training (MAML, Reptile) at scale.")
    commands = top.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="meta-train a job file into a run directory",
        description="Meta-train a job file into a run directory (a folder or a pyarrow.fs URI). In this process, "
                    "or with --workers N on Ray: N task-worker actors and a parameter-server actor (job keys "
                    "runtime.mode sync|async, runtime.staleness, runtime.placement, runtime.worker_cpus/gpus).")
    train.add_argument("job", nargs="?", help="YAML job file (see jobs/); omitted with --resume")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a job key, e.g. --set train.steps=100 (repeatable); "
                            "with --resume only train.* keys other than meta_batch and the runtime's resource keys may change")
    train.add_argument("--out", help="run location: a folder or a URI such as s3://bucket/runs/x (default "
                                     "<runtime.storage or runs>/<name>-<date>-<time>); must hold no run yet")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue RUN_DIR (folder or URI) from its newest checkpoint, with its own config")
    train.add_argument("--workers", type=int, help="Ray task-worker actors (same as --set runtime.workers=N)")
    train.add_argument("--address", help="Ray cluster address (same as --set runtime.address=...; default "
                                         "$RAY_ADDRESS, else an embedded local Ray)")
    train.set_defaults(run=_train)

    ev = commands.add_parser("eval", help="re-evaluate a run's checkpoint on fresh tasks")
    ev.add_argument("run_dir", help="run folder or URI")
    ev.add_argument("--tasks", type=int, help="number of tasks (default: the job's eval.tasks)")
    ev.add_argument("--steps", type=int, help="adaptation steps (default: the job's eval.inner_steps)")
    ev.add_argument("--split", choices=("train", "val", "test"), help="default: the job's eval.split")
    ev.add_argument("--round", type=int, default=1, help="task draw; 0 is the one scored after training")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(run=_eval)

    toy = commands.add_parser("toy", help="sinusoid MAML vs pre-training, table and figure")
    toy.add_argument("--out", help="output directory (default runs/toy-<date>-<time>)")
    toy.add_argument("--steps", type=int, default=None, help="meta-training steps per method")
    toy.add_argument("--seed", type=int, default=0)
    toy.set_defaults(run=_toy)

    sw = commands.add_parser("sweep", help="hyperparameter sweep with Ray Tune (ASHA), each trial a Ray run")
    sw.add_argument("sweep", help="YAML sweep file (see jobs/sweep_*.yaml)")
    sw.add_argument("--out", help="sweep folder (default runs/<sweep name>)")
    sw.add_argument("--resume", action="store_true",
                    help="finish the sweep in its folder after the driver stopped; completed trials are kept")
    sw.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else an embedded local Ray)")
    sw.set_defaults(run=_sweep)

    cmp = commands.add_parser(
        "compare", help="MAML vs multilingual pre-training for low-resource translation (Gu et al. 2018)",
        description="Data preparation, meta-training (parameter-server runtime), pre-training (Ray Train), "
                    "fine-tuning every target at every budget, decoding and a sacrebleu report; each stage cached "
                    "in the run folder and resumable.")
    cmp.add_argument("compare", help="YAML comparison file (see jobs/translation_compare*.yaml)")
    cmp.add_argument("--out", help="run folder (default runs/<name>); rerunning into it continues")
    cmp.add_argument("--stage", default="all", choices=("all", "prepare", "meta", "pretrain", "finetune", "report"),
                     help="run one stage only (its inputs must exist)")
    cmp.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else an embedded local Ray)")
    cmp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key of the comparison file, e.g. --set 'targets=[ron]' or "
                          "--set 'overrides=[algorithm.inner_optimizer=adam]' (the meta job's own overrides)")
    cmp.set_defaults(run=_compare)

    validate = commands.add_parser("validate", help="check job, sweep and comparison files without running them")
    validate.add_argument("jobs", nargs="+")
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    validate.set_defaults(run=_validate)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.run(args)
    except (ConfigError, DataError, OSError, NonFiniteError, ValueError) as error:
        cause = getattr(error, "cause", None)  # raised in a Ray actor: its own message, not Ray's traceback
        print(f"error: {cause if isinstance(cause, BaseException) else error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``distmeta`` command: ``main`` in a process that glibc started with
    ``ALLOCATOR_ENV`` (restarting itself once to get it; values the user set are kept)."""
    restart_with_allocator_env()
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
