"""Where a run's numbers go: CSV and TensorBoard files, and progress lines for people."""
from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

from tensorboardX import SummaryWriter

log = logging.getLogger("distmeta")


class MetricsLog:
    """One CSV row per logged step plus TensorBoard scalars."""

    def __init__(self, run_dir: str | Path, append: bool = False) -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.board = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.columns: list[str] | None = None
        if append and self.path.exists():
            with open(self.path, newline="") as handle:
                self.columns = next(csv.reader(handle), None)

    def write(self, step: int, values: dict[str, float]) -> None:
        """Append a row; a metric seen for the first time (e.g. the first validation)
        widens the header, rewriting the file once."""
        row = {"step": step, **values}
        new = [c for c in row if c not in (self.columns or [])]
        if new:
            old_rows = list(csv.DictReader(open(self.path, newline=""))) if self.columns else []
            self.columns = (self.columns or []) + new
            with open(self.path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, self.columns)
                writer.writeheader()
                writer.writerows(old_rows)
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self.columns).writerow(row)
        for name, value in values.items():
            self.board.add_scalar(name, value, step)

    def close(self) -> None:
        self.board.close()


class Progress:
    """Periodic progress lines: step, tasks/s and ETA against the step or time budget."""

    def __init__(self, total_steps: int, tasks_per_step: int, time_limit_s: float | None,
                 first_step: int = 0) -> None:
        self.total, self.tasks_per_step, self.time_limit = total_steps, tasks_per_step, time_limit_s
        self.first_step, self.start = first_step, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def tasks_per_s(self, step: int) -> float:
        return (step - self.first_step) * self.tasks_per_step / max(self.elapsed(), 1e-9)

    def line(self, step: int, values: dict[str, float]) -> str:
        done = step - self.first_step
        eta = (self.total - step) * self.elapsed() / max(done, 1)
        if self.time_limit is not None:
            eta = min(eta, max(self.time_limit - self.elapsed(), 0.0))
        shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        return (f"step {step}/{self.total} {shown} | {self.tasks_per_s(step):.1f} tasks/s | "
                f"elapsed {_clock(self.elapsed())} eta {_clock(eta)}")


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"
