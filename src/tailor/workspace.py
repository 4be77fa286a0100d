"""Run folders, manifest.json and atomic writes: the files that are the contract between stages.

Every writer here goes through a temporary file in the same folder followed by `os.replace`, so a crash or a bad
record half-way never leaves a truncated file where a good one stood.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from tailor.errors import TailorError

MANIFEST = "manifest.json"
TRACKED_PACKAGES = ("tailor", "torch", "transformers", "peft", "accelerate", "pydantic", "fastapi")


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: Path | str, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it becomes `target`, on error it is removed.

    With `replace=False` an existing `target` wins (another process finished the same work first).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists() and not replace:
            shutil.rmtree(tmp)
            return
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path | str, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: Path | str, records: Iterable[dict]) -> int:
    """Write records one JSON object per line, atomically; returns how many were written."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: Path | str) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line; a bad line raises with `file:line`."""
    path = Path(path)
    if not path.is_file():
        raise TailorError(f"{path}: file not found")
    with open(path, encoding="utf-8", errors="strict") as lines:
        try:
            for line_no, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TailorError(f"{path}:{line_no}: invalid JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(record, dict):
                    raise TailorError(f"{path}:{line_no}: expected a JSON object, found {type(record).__name__}")
                yield line_no, record
        except UnicodeDecodeError:
            raise TailorError(f"{path}: not valid UTF-8 text") from None


def read_json(path: Path | str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise TailorError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TailorError(f"{path}: invalid JSON ({exc})") from None


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def update_manifest(run_dir: Path | str, stage: str, *, config: dict | None = None,
                    inputs: Iterable[Path | str] = (), outputs: Iterable[Path | str] = (),
                    metrics: dict | None = None, extra: dict | None = None) -> dict:
    """Record one stage in `run_dir/manifest.json`: what went in (with hashes), what came out, metrics."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / MANIFEST
    manifest = read_json(manifest_path) if manifest_path.is_file() else {"stages": {}}
    manifest["packages"] = package_versions()
    if config is not None:
        manifest["config"] = config
    entry: dict[str, Any] = {
        "finished_at": now_iso(),
        "inputs": {str(p): file_sha256(p) for p in inputs if Path(p).is_file()},
        "outputs": [str(p) for p in outputs],
    }
    if metrics:
        entry["metrics"] = metrics
        manifest.setdefault("metrics", {}).update({f"{stage}.{k}": v for k, v in metrics.items()})
    if extra:
        entry.update(extra)
    manifest["stages"][stage] = entry
    write_json(manifest_path, manifest)
    return manifest


def link_or_copy(source: Path, target: Path) -> None:
    """`target` reads `source` through a symlink (runs share data files instead of copying them); a copy where the
    file system refuses links."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        target.symlink_to(Path(source).resolve())
    except OSError:
        shutil.copyfile(source, target)


# what the stages before training leave in a run folder, and every method reads from there: the corpus (continued
# pre-training, from_scratch), data/ with its subfolders (chat, preference, classification, pre-training blocks) and
# the retrieval index (rag, raft, METHOD+rag)
RUN_INPUTS = ("corpus.jsonl", "data", "index")


def derive_run_folder(run_dir: Path | str, derived_dir: Path | str) -> list[Path]:
    """Make `derived_dir` (a tune trial, a compared method) a run folder on RUN's inputs: each file of RUN_INPUTS is
    linked at the same place, so every method finds its data where it looks in RUN; what it writes (adapter,
    metrics, eval/) stays in `derived_dir`. Returns the linked files."""
    run_dir, derived_dir = Path(run_dir), Path(derived_dir)
    linked = []
    for name in RUN_INPUTS:
        source = run_dir / name
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        for path in files:
            link_or_copy(path, derived_dir / path.relative_to(run_dir))
            linked.append(derived_dir / path.relative_to(run_dir))
    return linked
