"""distmeta: MAML, first-order MAML, Reptile and pre-training, from one process to a cluster.

The Python API mirrors the CLI: ``train(load_job(path))``, ``evaluate_run(run_dir)``.
"""
from distmeta.config import ConfigError, JobConfig, load_job
from distmeta.evaluate import evaluate, evaluate_run
from distmeta.train import train

__all__ = ["ConfigError", "JobConfig", "evaluate", "evaluate_run", "load_job", "train"]
