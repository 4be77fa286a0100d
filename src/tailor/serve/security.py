"""Who may call the server and how much: hashed API keys with scopes, per-key rate limits, and input sanitization.

Keys live in a JSON file (`tailor keys create`) as SHA-256 hashes, never in clear:

    {"keys": [{"name": "web", "sha256": "9f2c…", "scopes": ["chat"], "rate_limit": "120/minute",
               "created_at": "2026-11-22T19:00:00+00:00"}]}

A key is 32 random bytes, so a fast hash is enough: slow password hashes (bcrypt, argon2) exist to protect guessable
secrets, and there is nothing to guess here. Scopes: `chat` (completions, models, feedback), `admin` (everything,
plus adding and removing adapters and reading /metrics), and the roles of the operations console at /admin, each
allowing what the one before allows: `viewer` (read every screen), `reviewer` (also accept, edit or reject
corrections), `approver` (also promote and roll back versions, change canary shares).

A running server sees changes to the key file without a restart: before each lookup it compares the file's
modification time, size and inode with what it last read (one stat call) and re-reads it when they differ, so
`tailor keys revoke` takes effect on the next request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from limits import parse, storage, strategies

from tailor.errors import TailorError
from tailor.serve.filters import injection_pattern
from tailor.serve.metrics import ServerMetrics
from tailor.serve.openai.protocol import ApiError
from tailor.workspace import now_iso, read_json, write_json

ROLES = ("viewer", "reviewer", "approver")  # the console's roles, each one allowing what the ones before it allow
SCOPES = ("chat", "admin", *ROLES)
KEY_PREFIX = "tlr-"

# markers of common chat templates; a tokenizer's own special tokens are added to these
ROLE_MARKERS = ("<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|begin_of_text|>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")
# C0 and C1 control characters except tab, newline and carriage return; plus bidi overrides that hide text
log = logging.getLogger(__name__)

CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    scopes: tuple[str, ...]
    rate_limit: str | None = None

    def allows(self, scope: str) -> bool:
        if "admin" in self.scopes or scope in self.scopes:
            return True
        # an approver may do what a reviewer may, and a reviewer what a viewer may
        return scope in ROLES and any(ROLES.index(held) > ROLES.index(scope) for held in self.scopes if held in ROLES)


@dataclass(frozen=True)
class Caller:
    """Who made a request: a key's name, or the client address when the server has no keys."""

    identity: str
    key: ApiKey | None = None


def check_rate_limit(text: str, where: str) -> str:
    try:
        parse(text)
    except ValueError:
        raise TailorError(f"{where}: {text!r} is not a rate limit; write e.g. 60/minute or 5/second") from None
    return text


def read_keys(path: Path | str) -> list[ApiKey]:
    """The keys in a key file; a missing or malformed file is a TailorError naming it."""
    path = Path(path)
    if not path.is_file():
        raise TailorError(f"{path}: no such API key file; create one with `tailor keys create NAME --file {path}`")
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise TailorError(f'{path}: an API key file is a JSON object {{"keys": [...]}}')
    keys = []
    for i, entry in enumerate(data["keys"]):
        where = f"{path}: keys[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not re.fullmatch(
                r"[0-9a-f]{64}", str(entry.get("sha256", ""))):
            raise TailorError(f"{where}: needs a name and a 64-hex-digit sha256")
        scopes = tuple(entry.get("scopes") or ())
        if not scopes or any(s not in SCOPES for s in scopes):
            raise TailorError(f"{where}: scopes must be a non-empty list of {', '.join(SCOPES)} (found {scopes})")
        limit = entry.get("rate_limit")
        keys.append(ApiKey(entry["name"], entry["sha256"], scopes,
                           check_rate_limit(limit, f"{where}.rate_limit") if limit else None))
    return keys


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


class KeyStore:
    """The keys of a key file, re-read when the file changes (`path` None: a fixed list)."""

    def __init__(self, keys: list[ApiKey], path: Path | None = None):
        self.keys = keys
        self.path = path
        self._stamp = _file_stamp(path) if path is not None else None
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path | str) -> KeyStore:
        return cls(read_keys(path), Path(path))

    def refresh(self) -> None:
        """Re-read the file if it changed since the last read (`tailor keys` replaces it atomically, so the inode
        changes too). A file that went missing or no longer parses refuses every key, logged, until it is fixed:
        a revocation written badly must not leave the revoked key valid."""
        if self.path is None or _file_stamp(self.path) == self._stamp:
            return
        with self._lock:
            stamp = _file_stamp(self.path)
            if stamp == self._stamp:  # another request re-read it meanwhile
                return
            try:
                self.keys = read_keys(self.path)
                log.info("%s changed: %d API keys loaded", self.path, len(self.keys))
            except TailorError as exc:
                log.error("%s; every API key is refused until the file is fixed", exc)
                self.keys = []
            self._stamp = stamp

    def find(self, key: str) -> ApiKey | None:
        self.refresh()
        digest = hash_key(key)
        for entry in self.keys:  # every entry compared in constant time: the timing says nothing of near misses
            if hmac.compare_digest(entry.sha256, digest):
                return entry
        return None


def create_key(path: Path | str, name: str, scopes: list[str], rate_limit: str | None = None) -> str:
    """Add a key to the file (created if missing) and return it; only its hash is stored."""
    path = Path(path)
    unknown = [s for s in scopes if s not in SCOPES]
    if not scopes or unknown:
        raise TailorError(f"--scope: must be one or more of {', '.join(SCOPES)} (found {', '.join(unknown) or 'none'})")
    if rate_limit:
        check_rate_limit(rate_limit, "--rate-limit")
    data = {"keys": [vars(k) | {"scopes": list(k.scopes)} for k in KeyStore.load(path).keys]} if path.is_file() \
        else {"keys": []}
    if any(entry["name"] == name for entry in data["keys"]):
        raise TailorError(f"{path}: a key named '{name}' exists; revoke it first or pick another name")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    entry = {"name": name, "sha256": hash_key(key), "scopes": scopes, "created_at": now_iso()}
    if rate_limit:
        entry["rate_limit"] = rate_limit
    data["keys"].append(entry)
    write_json(path, data)
    path.chmod(0o600)
    return key


def revoke_key(path: Path | str, name: str) -> None:
    path = Path(path)
    data = read_json(path) if path.is_file() else {"keys": []}
    kept = [entry for entry in data.get("keys", []) if entry.get("name") != name]
    if len(kept) == len(data.get("keys", [])):
        raise TailorError(f"{path}: no key named '{name}'")
    write_json(path, {"keys": kept})


def bearer_token(authorization: str | None, api_key_header: str | None) -> str | None:
    if api_key_header:
        return api_key_header.strip()
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


class RateLimiter:
    """A moving window per caller (the `limits` package keeps the counts in memory). Refusals are counted per key
    name in `metrics` (tailor_rate_limited_total)."""

    def __init__(self, default: str, metrics: ServerMetrics | None = None):
        self.default = parse(check_rate_limit(default, "serve.rate_limit"))
        self.metrics = metrics
        self._limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())

    def hit(self, caller: Caller) -> None:
        item = parse(caller.key.rate_limit) if caller.key and caller.key.rate_limit else self.default
        if not self._limiter.hit(item, caller.identity):
            reset = self._limiter.get_window_stats(item, caller.identity).reset_time
            retry = max(1, int(reset - time.time() + 0.999))
            if self.metrics is not None:
                self.metrics.rate_limited.labels(caller.key.name if caller.key else "-").inc()
            raise ApiError(429, f"rate limit of {item} exceeded for this key; retry in {retry} s",
                           type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": str(retry)})


@dataclass
class Sanitizer:
    """Checks and cleans what clients send before it reaches the chat template. With `metrics`, what it refuses or
    cleans and the prompt-injection patterns it sees are counted, labelled with the requested `model`."""

    max_turns: int
    max_turn_chars: int
    markers: tuple[str, ...] = field(default=ROLE_MARKERS)
    metrics: ServerMetrics | None = None

    @classmethod
    def for_tokenizer(cls, tokenizer, max_turns: int, max_turn_chars: int,
                      metrics: ServerMetrics | None = None) -> Sanitizer:
        special = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        special.update(getattr(tokenizer, "all_special_tokens", []))
        return cls(max_turns, max_turn_chars, tuple(sorted({*ROLE_MARKERS, *special} - {""}, key=len, reverse=True)),
                   metrics)

    def _count(self, model: str, action: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.inputs_filtered.labels(model, action, reason).inc()

    def text(self, text: str, param: str, model: str = "-") -> str:
        """Control characters are dropped; a chat-template marker is refused: inside content it would let the
        sender write turns of its own (a fake system message) once the template is applied."""
        if len(text) > self.max_turn_chars:
            self._count(model, "blocked", "too_long")
            raise ApiError(400, f"{param}: {len(text)} characters; at most {self.max_turn_chars} are accepted",
                           param=param, code="string_above_max_length")
        for marker in self.markers:
            if marker in text:
                self._count(model, "blocked", "template_marker")
                raise ApiError(400, f"{param}: contains the chat-template marker {marker!r}, which clients may "
                                    f"not send", param=param, code="invalid_content")
        pattern = injection_pattern(text)
        if pattern is not None and self.metrics is not None:
            self.metrics.injection_attempts.labels(model, pattern).inc()
        cleaned = CONTROL.sub("", text)
        if cleaned != text:
            self._count(model, "sanitized", "control_characters")
        return cleaned

    def messages(self, messages: list[dict], model: str = "-") -> list[dict]:
        if len(messages) > self.max_turns:
            self._count(model, "blocked", "too_many_messages")
            raise ApiError(400, f"messages: {len(messages)} messages; at most {self.max_turns} are accepted",
                           param="messages", code="too_many_messages")
        return [{**m, "content": self.text(m["content"], f"messages[{i}].content", model)}
                for i, m in enumerate(messages)]
