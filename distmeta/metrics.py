"""Where a run's numbers go: CSV and TensorBoard files, and progress lines for people."""
from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path

from tensorboardX import SummaryWriter

from distmeta.storage import Location

log = logging.getLogger("distmeta")


class MetricsLog:
    """One CSV row per logged step plus TensorBoard scalars."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None) -> None:
        """With ``resume_step``, continue the run's files, dropping what was logged after that
        step (it is about to be recomputed), so steps stay unique and increasing."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.csv"
        self.columns: list[str] | None = None
        self.board = None
        self.truncate(resume_step)

    def truncate(self, step: int | None) -> None:
        """Drop the rows after ``step`` (a rewind to that checkpoint) and reopen TensorBoard
        purging the same steps; ``None`` starts a fresh file at the first write."""
        purge = None
        if step is not None and self.path.exists():
            self._rewrite([row for row in self._read_rows() if int(row["step"]) <= step])
            purge = step + 1
        if self.board is not None:
            self.board.close()
        self.board = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge)

    def _read_rows(self) -> list[dict]:
        """The file's rows, its header taken as the columns. A cut last row (a crash while it
        was appended, so after the newest checkpoint) is dropped with a warning.

        Raises:
            ValueError: no step column, or a malformed row before the last (names the line).
        """
        with open(self.path, newline="", errors="replace") as handle:
            reader = csv.DictReader(handle)
            self.columns = list(reader.fieldnames or []) or None
            rows = list(reader)
        if "step" not in (self.columns or []):
            raise ValueError(f"{self.path} has no step column (header {self.columns}); it is not a metrics file")

        def whole(row: dict) -> bool:
            return None not in row and None not in row.values() and row["step"].isdigit()

        if rows and not whole(rows[-1]):
            log.warning("%s: dropping its cut last row %s", self.path, rows.pop())
        broken = [line for line, row in enumerate(rows, start=2) if not whole(row)]
        if broken:
            raise ValueError(f"{self.path} line {broken[0]} is malformed; repair or remove that row to resume")
        return rows

    def _rewrite(self, rows: list[dict]) -> None:
        """Replace the file at once: a crash while rewriting must not lose the history."""
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, self.columns or [])
        writer.writeheader()
        writer.writerows(rows)
        Location(self.path).write_bytes(text.getvalue().encode())

    def write(self, step: int, values: dict[str, float]) -> None:
        """Append a row; a metric seen for the first time (e.g. the first validation)
        widens the header, rewriting the file once."""
        row = {"step": step, **values}
        new = [c for c in row if c not in (self.columns or [])]
        if new:
            old_rows = self._read_rows() if self.columns else []
            self.columns = (self.columns or []) + new
            self._rewrite(old_rows)
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self.columns).writerow(row)
        for name, value in values.items():
            self.board.add_scalar(name, value, step)

    def close(self) -> None:
        self.board.close()


class PendingRows:
    """Logged rows waiting for their validation (computed elsewhere), written in step order
    as the results arrive, so validation never holds up training."""

    def __init__(self, metrics_log: MetricsLog, progress: "Progress") -> None:
        self.log, self.progress = metrics_log, progress
        self.queue: deque[tuple[int, dict[str, float], Future | None]] = deque()
        self.written: list[dict[str, float]] = []  # rows written since the caller last cleared it

    def add(self, step: int, values: dict[str, float], validation: Future | None) -> None:
        log.info(self.progress.line(step, values))
        self.queue.append((step, values, validation))
        self.write_ready()

    def write_ready(self, wait: bool = False) -> None:
        """Write the leading rows whose validation is done (all of them with ``wait``)."""
        while self.queue and (wait or self.queue[0][2] is None or self.queue[0][2].done()):
            step, values, validation = self.queue.popleft()
            if validation is not None:
                result = validation.result()
                log.info("step %d validation: %s", step, " ".join(f"{k} {v:.4g}" for k, v in result.items()))
                if not math.isfinite(result.get("val_loss", 0.0)):
                    log.warning("step %d: the validation loss is %s, adaptation diverges from this Φ (lower "
                                "algorithm.inner_lr or eval.inner_steps); the final test will refuse to score it",
                                step, result["val_loss"])
                values = values | result
            self.log.write(step, values)
            self.written.append({"step": step, **values})

    def drop_after(self, step: int) -> None:
        self.queue = deque(row for row in self.queue if row[0] <= step)


class Progress:
    """Periodic progress lines: step, tasks/s and ETA against the step or time budget."""

    def __init__(self, total_steps: int, tasks_per_step: int, time_limit_s: float | None,
                 first_step: int = 0, elapsed_before_s: float = 0.0) -> None:
        """``elapsed_before_s``: training time of earlier sessions of a resumed run, which
        counts against the time limit."""
        self.total, self.tasks_per_step, self.time_limit = total_steps, tasks_per_step, time_limit_s
        self.first_step, self.before, self.start = first_step, elapsed_before_s, time.perf_counter()

    def session_elapsed(self) -> float:
        return time.perf_counter() - self.start

    def elapsed(self) -> float:
        """Training time of the whole run so far."""
        return self.before + self.session_elapsed()

    def out_of_time(self) -> bool:
        return self.time_limit is not None and self.elapsed() >= self.time_limit

    def tasks_per_s(self, step: int) -> float:
        """Throughput of this session."""
        return (step - self.first_step) * self.tasks_per_step / max(self.session_elapsed(), 1e-9)

    def line(self, step: int, values: dict[str, float]) -> str:
        done = step - self.first_step
        eta = (self.total - step) * self.session_elapsed() / max(done, 1)
        if self.time_limit is not None:
            eta = min(eta, max(self.time_limit - self.elapsed(), 0.0))
        shown = " ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "tasks_per_s")
        return (f"step {step}/{self.total} {shown} | {self.tasks_per_s(step):.1f} tasks/s | "
                f"elapsed {_clock(self.elapsed())} eta {_clock(eta)}")


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def plot_learning_curve(run_dir: str | Path) -> Path:
    """``learning_curve.png`` from ``metrics.csv``: training loss and train/val accuracy
    (or MSE) against meta-steps, with the validation 95% band where there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    series = lambda key: [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]  # noqa: E731
    metric = "accuracy" if any(r.get("train_accuracy") for r in rows) else "mse"
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps, losses = zip(*series("train_loss"))
    left.plot(steps, losses, label="train query loss (after adaptation)")
    if series("val_loss"):
        left.plot(*zip(*series("val_loss")), "o-", label="val query loss")
    left.set_xlabel("meta-step")
    left.set_yscale("log")
    left.legend()
    if series(f"train_{metric}"):
        right.plot(*zip(*series(f"train_{metric}")), label=f"train {metric}")
    if series(f"val_{metric}"):
        val_steps, values = zip(*series(f"val_{metric}"))
        _, half = zip(*series(f"val_{metric}_ci95"))
        right.errorbar(val_steps, values, yerr=half, fmt="o-", capsize=3, label=f"val {metric} (95% CI)")
    right.set_xlabel("meta-step")
    right.set_ylabel(metric)
    right.grid(alpha=0.3)
    if right.get_legend_handles_labels()[0]:
        right.legend()
    figure.suptitle(run_dir.name)
    figure.tight_layout()
    path = run_dir / "learning_curve.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
