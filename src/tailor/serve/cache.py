"""Answers to identical deterministic requests (temperature 0 or a fixed seed), kept in memory, least recently used
first out. A cached answer is the filtered text the first caller got, so a hit costs no model time at all."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from cachetools import LRUCache


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    citations: list[dict] | None = None  # a grounded model's sources, served again with the answer


class ResponseCache:
    def __init__(self, size: int):
        self.size = size
        self._entries: LRUCache = LRUCache(maxsize=max(size, 1))
        self._lock = threading.Lock()  # cachetools' caches are not thread-safe, and streams finish on worker threads

    @staticmethod
    def key(endpoint: str, model: str, prompt, sampling: dict) -> str:
        return json.dumps([endpoint, model, prompt, sampling], sort_keys=True, ensure_ascii=False)

    def get(self, key: str) -> CachedAnswer | None:
        if not self.size:
            return None
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, answer: CachedAnswer) -> None:
        if self.size:
            with self._lock:
                self._entries[key] = answer

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
