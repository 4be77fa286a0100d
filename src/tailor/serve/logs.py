"""Structured request logs: one JSON object per line per request, personal data in prompts and answers redacted,
API keys and secrets never written (only a key's name)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from tailor.data.pii import PiiRedactor
from tailor.workspace import now_iso


class RequestLog:
    def __init__(self, path: Path | str | None):
        self.path = Path(path) if path else None
        self._redactor = PiiRedactor("redact")
        self._lock = threading.Lock()  # whole lines: two requests finishing at once must not interleave
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def redact(self, text: str) -> str:
        return self._redactor.apply(text)[0]

    def write(self, **record) -> None:
        if not self.path:
            return
        for field in ("prompt", "answer"):
            if isinstance(record.get(field), str):
                record[field] = self.redact(record[field])
            elif isinstance(record.get(field), list):  # chat messages
                record[field] = [{**m, "content": self.redact(m["content"])} for m in record[field]]
        line = json.dumps({"time": now_iso(), **record}, ensure_ascii=False)
        with self._lock, self.path.open("a", encoding="utf-8") as out:
            out.write(line + "\n")
