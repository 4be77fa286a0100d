"""The improve folder's state file and lock.

state.json holds the current cycle (its folder, the production version it started from, each finished stage with
what it wrote) and a short history of earlier cycles. It is rewritten through a temporary file and a rename after
every stage, so a crash leaves the last finished stage recorded and a rerun starts at the next one.

The lock is an `flock` on a file: the kernel drops it when the process ends, however it ends, so a killed run never
leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tailor.errors import TailorError
from tailor.workspace import now_iso, read_json, write_json

STATE_FILE = "state.json"
LOCK_FILE = "improve.lock"


class LockedError(TailorError):
    """Another `tailor improve` holds the lock."""


@contextlib.contextmanager
def hold_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise LockedError(f"{path}: another `tailor improve` is running ({holder}); nothing was changed. "
                              f"Run it again when that one has finished") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {now_iso()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing the descriptor releases the flock


class State:
    """FOLDER/state.json: {"cycle": N, "current": {...} or null, "history": [...]}."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / STATE_FILE
        self.data: dict[str, Any] = read_json(self.path) if self.path.is_file() else {"cycle": 0, "current": None,
                                                                                        "history": []}
        if not isinstance(self.data, dict) or "history" not in self.data:
            raise TailorError(f"{self.path}: not an improve state file; move it away to start over")

    @property
    def current(self) -> dict | None:
        return self.data.get("current")

    @property
    def cycle(self) -> dict:
        """The open cycle: the stages run only inside one, so its absence is a bug, not a user's mistake."""
        current = self.current
        if current is None:
            raise AssertionError(f"{self.path}: no improve cycle is open")
        return current

    def start_cycle(self, production: dict) -> dict:
        self.data["cycle"] += 1
        number = self.data["cycle"]
        self.data["current"] = {"cycle": number, "folder": f"cycle-{number:04d}", "started_at": now_iso(),
                                "production": production, "stages": {}}
        self.save()
        return self.data["current"]

    def cycle_dir(self) -> Path:
        return self.folder / self.cycle["folder"]

    def done(self, stage: str) -> dict | None:
        return self.current["stages"].get(stage) if self.current else None

    def record(self, stage: str) -> dict:
        """What a finished stage wrote; a later stage reads it, and the stages run in order."""
        finished = self.done(stage)
        if finished is None:
            raise AssertionError(f"{self.path}: stage {stage} has not finished in this cycle")
        return finished

    def finish(self, stage: str, record: dict) -> dict:
        self.cycle["stages"][stage] = {"finished_at": now_iso(), **record}
        self.save()
        return self.cycle["stages"][stage]

    def end_cycle(self, outcome: str, reason: str) -> None:
        """Close the current cycle; the next `tailor improve` starts a new one."""
        current = self.cycle
        current.update(outcome=outcome, reason=reason, ended_at=now_iso())
        self.data["history"].append({key: current.get(key) for key in
                                     ("cycle", "folder", "started_at", "ended_at", "production", "outcome",
                                      "reason", "candidate")})
        self.data["current"] = None
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)
