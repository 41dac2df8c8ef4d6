"""A training run's metric log: ``metrics.jsonl`` and ``metrics.csv`` (one row per
logging step, appended as training goes) and the loss curve ``loss.png``.

Only the main process writes; every process keeps the rows in memory.  A
resumed run drops the rows after its checkpoint's step (a crash after logging
but before checkpointing must not leave them twice).
"""
from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path

from .files import write_text_atomic

__all__ = ["RunLog", "CSV_COLUMNS"]

CSV_COLUMNS = ("step", "loss", "lr", "grad_norm", "val_loss", "val_loss_ema", "images_per_s", "elapsed", "skipped")


class RunLog:
    """The rows logged so far and the files in ``out_dir`` that hold them.

    :param out_dir: the run directory.
    :param writes: whether this process writes the files (rank 0 only).
    """

    def __init__(self, out_dir, writes: bool = True):
        self.out_dir = Path(out_dir)
        self.writes = writes
        self.rows: list[dict] = []

    @property
    def jsonl(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    @property
    def csv(self) -> Path:
        return self.out_dir / "metrics.csv"

    def start(self) -> None:
        """A new run: no rows, empty files (with the CSV header)."""
        self.rows = []
        self._rewrite()

    def truncate(self, step: int) -> None:
        """Keep the rows of the files up to ``step`` (lines cut by a crash are dropped)."""
        rows = []
        if self.jsonl.exists():
            for line in self.jsonl.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                    rows.append(row)
        self.rows = rows
        self._rewrite()

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if not self.writes:
            return
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", encoding="utf-8") as f:
            f.write(_csv_line(row))

    def plot(self) -> Path | None:
        """``out_dir/loss.png`` from the rows (None when nothing to draw, or not the writing process)."""
        from .plots import plot_lines

        if not self.writes:
            return None
        series = {}
        for key, name in (("loss", "train"), ("val_loss", "val"), ("val_loss_ema", "val (EMA)")):
            pts = [(r["step"], r[key]) for r in self.rows if r.get(key) is not None]
            if pts:
                series[name] = ([p[0] for p in pts], [p[1] for p in pts])
        if not series:
            return None
        path = self.out_dir / "loss.png"
        try:
            plot_lines(series, path, title="loss", xlabel="step", ylabel="loss", logy=True)
        except Exception as e:  # a plot must never end a training run
            warnings.warn(f"could not draw {path}: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=3)
            return None
        return path

    def _rewrite(self) -> None:
        if not self.writes:
            return
        write_text_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        write_text_atomic(self.csv, ",".join(CSV_COLUMNS) + "\n" + "".join(_csv_line(r) for r in self.rows))


def _csv_line(row: dict) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(["" if row.get(k) is None else row[k] for k in CSV_COLUMNS])
    return buf.getvalue()
