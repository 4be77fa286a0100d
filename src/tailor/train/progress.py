"""A Rich progress bar for training: steps, ETA, smoothed loss and tokens/s."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, description: str = "training"):
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            console=Console(file=sys.stderr), disable=not enabled)
        self._task = self._progress.add_task(description, total=total, completed=start, loss="-", tps="-")

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)

    def update(self, step: int, *, loss: float | None, tokens_per_s: float) -> None:
        self._progress.update(self._task, completed=step, loss=f"{loss:.4f}" if loss is not None else "-",
                              tps=f"{tokens_per_s:,.0f}")
