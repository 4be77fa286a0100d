"""The ingest stage: document files in, `corpus.jsonl` out (one record per chunk, with where it came from).

read (readers/, by extension) -> normalize (clean.py) -> personal data (pii.py, when asked) -> drop exact and
near duplicates (dedup.py) -> chunk (chunk.py) -> write.

Personal data is replaced before deduplication, so two copies that differ only in a redacted phone number count
as the same document, and before chunking, so no chunk can carry half of an email address past the redactor.

One bad file never stops the batch: it is listed in `IngestSummary.skipped` with the reason and the rest goes on.
The corpus is written atomically, so a run that fails leaves the previous `corpus.jsonl` as it was.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from tailor.data.chunk import chunk_text
from tailor.data.clean import normalize_text
from tailor.data.dedup import Cluster, Deduplicator
from tailor.data.pii import PiiRedactor
from tailor.data.readers import Document, ReaderWarning, read_document, supported_extensions
from tailor.errors import TailorError
from tailor.workspace import write_jsonl


@dataclass
class IngestSummary:
    files_read: int = 0  # files that gave at least one document
    documents: int = 0  # documents (a file, or a PDF page) that gave records
    records: int = 0
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # exact: (removed, kept)
    near_duplicates: list[Cluster] = field(default_factory=list)  # one per kept document that had near copies
    pii_mode: str | None = None
    pii_counts: dict[str, int] = field(default_factory=dict)  # findings replaced, by type (in every document read)
    pii_kept: dict[str, int] = field(default_factory=dict)  # findings left as written by `pii_keep`
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    warnings: list[str] = field(default_factory=list)
    output: str | None = None

    def to_dict(self) -> dict:
        return {
            "output": self.output,
            "files_read": self.files_read,
            "documents": self.documents,
            "records": self.records,
            "duplicates": [{"removed": removed, "kept": kept} for removed, kept in self.duplicates],
            "near_duplicates": [cluster.to_dict() for cluster in self.near_duplicates],
            "pii": {"mode": self.pii_mode, "counts": dict(self.pii_counts), "kept": dict(self.pii_kept)},
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
            "warnings": list(self.warnings),
        }


def ingest(sources: Sequence[str | Path], output: Path | str, *, chunk_chars: int = 1500, chunk_overlap: int = 200,
           min_chars: int = 20, pii: str | None = None, pii_keep: Sequence[str] = (),
           near_dup_threshold: float | None = 0.85, progress: bool = True) -> IngestSummary:
    """Read every supported file under `sources` into chunk records written to `output` (JSON lines).

    Folders are searched recursively in sorted order; hidden files and folders (`.git`, `.DS_Store`) are ignored.
    Each record: id, text, source, page, chunk, char_start, char_end (offsets in the normalized document or page,
    after personal data was replaced), sha256 (of the chunk text), title.

    `pii`: None (off), "redact", "mask" or "pseudonymize"; findings matching a `pii_keep` regex stay as written.
    `near_dup_threshold`: documents at least this similar (Jaccard over word 5-grams) to an earlier one are
    dropped; None or 0 keeps near copies and drops exact ones only.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise TailorError("ingest: no sources given (name document files or folders)")
    chunk_text("", chunk_chars, chunk_overlap)  # rejects bad sizes before any file is read
    # both reject bad options here, before any file is read
    redactor = PiiRedactor(pii, keep=pii_keep) if pii else None
    dedup = Deduplicator(near_dup_threshold)
    output = Path(output)
    files, skipped = _collect_files(sources, exclude=output)
    summary = IngestSummary(skipped=skipped, output=str(output), pii_mode=pii)
    with _file_progress(len(files), enabled=progress) as advance:
        records = _records(files, summary, sources, chunk_chars=chunk_chars, chunk_overlap=chunk_overlap,
                           min_chars=min_chars, redactor=redactor, dedup=dedup, advance=advance)
        # _records raises after the last file when nothing came out; write_jsonl then discards its temporary file
        summary.records = write_jsonl(output, records)
    return summary


def _collect_files(sources: Sequence[str | Path], exclude: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to read, in a stable order, and the (path, reason) of those whose type no reader handles."""
    for source in sources:  # all checked first: a typo should not cost a half-finished run
        if not Path(source).exists():
            raise TailorError(f"{source}: file or folder not found")
    candidates: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            candidates += sorted(path for path in source.rglob("*") if path.is_file()
                                 and not any(part.startswith(".") for part in path.relative_to(source).parts))
        else:
            candidates.append(source)
    # One name per file: a file named twice, or a symlink beside its target (docs often link index.html to a page),
    # is read once, under the target's own name when both were found. Our own output is never read.
    output = os.path.realpath(exclude)
    chosen: dict[str, Path] = {}
    for path in candidates:
        real = os.path.realpath(path)
        if real == output:
            continue
        if real not in chosen or (chosen[real].is_symlink() and not path.is_symlink()):
            chosen[real] = path
    extensions = set(supported_extensions())
    files, skipped = [], []
    for path in candidates:
        if chosen.get(os.path.realpath(path)) is not path:
            continue
        if path.suffix.lower() in extensions:
            files.append(path)
        else:
            kind = f"'{path.suffix.lower()}'" if path.suffix else "no extension"
            skipped.append((_display(path), f"unsupported file type ({kind})"))
    return files, skipped


def _records(files: list[Path], summary: IngestSummary, sources: Sequence[str | Path], *, chunk_chars: int,
             chunk_overlap: int, min_chars: int, redactor: PiiRedactor | None, dedup: Deduplicator,
             advance: Callable[[str], None]) -> Iterator[dict]:
    written = 0
    try:
        for record in _file_records(files, summary, chunk_chars=chunk_chars, chunk_overlap=chunk_overlap,
                                    min_chars=min_chars, redactor=redactor, dedup=dedup, advance=advance):
            written += 1
            yield record
    finally:  # the summary is complete even when a failure stops the run early
        summary.duplicates = list(dedup.exact_duplicates)
        summary.near_duplicates = dedup.near_clusters()
        if redactor is not None:
            summary.pii_counts, summary.pii_kept = dict(redactor.counts), dict(redactor.kept)
    if written == 0:
        raise TailorError(_nothing_written(sources, summary))


def _file_records(files: list[Path], summary: IngestSummary, *, chunk_chars: int, chunk_overlap: int,
                  min_chars: int, redactor: PiiRedactor | None, dedup: Deduplicator,
                  advance: Callable[[str], None]) -> Iterator[dict]:
    for path in files:
        name = _display(path)
        advance(name)
        documents = _read_file(name, summary)
        if documents is None:
            continue
        texts = [(document, normalize_text(document.text)) for document in documents]
        if redactor is not None:
            texts = [(document, redactor.apply(text)[0]) for document, text in texts]
        if not any(text for _, text in texts):
            summary.skipped.append((name, "empty file" if path.stat().st_size == 0 else "no text found"))
            continue
        if all(len(text) < min_chars for _, text in texts):
            longest = max(len(text) for _, text in texts)
            summary.skipped.append((name, f"only {longest} characters of text (min_chars={min_chars})"))
            continue
        summary.files_read += 1
        too_short = []  # pages: a file whose every document is too short was skipped above
        for document, text in texts:
            label = name if document.page is None else f"{name} (page {document.page})"
            if len(text) < min_chars:
                too_short.append(str(document.page))
                continue
            if dedup.check(label, text) is not None:
                continue
            chunks = [chunk for chunk in chunk_text(text, chunk_chars, chunk_overlap) if len(chunk[2]) >= min_chars]
            summary.documents += 1
            title = redactor.apply(document.title)[0] if redactor is not None and document.title else document.title
            for index, (start, end, chunk) in enumerate(chunks):
                yield {"id": _sha256(f"{name}\0{document.page or ''}\0{index}")[:16], "text": chunk,
                       "source": name, "page": document.page, "chunk": index, "char_start": start,
                       "char_end": end, "sha256": _sha256(chunk), "title": title}
        if too_short:
            summary.warnings.append(f"{name}: page{'s' if len(too_short) > 1 else ''} {', '.join(too_short)} "
                                    f"shorter than min_chars={min_chars}; dropped")


def _read_file(name: str, summary: IngestSummary) -> list[Document] | None:
    """All documents of one file, or None (with the reason in summary.skipped) when it cannot be read."""
    documents, reason = None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReaderWarning)
        try:
            # whole file at once: a file that fails half-way contributes nothing rather than a fragment
            documents = list(read_document(name))
        except TailorError as exc:
            reason = str(exc).removeprefix(f"{name}: ")
        except Exception as exc:  # noqa: BLE001 - a library choking on one odd file must not end the batch
            reason = f"could not read ({type(exc).__name__}: {exc})"
    for warning in caught:
        if issubclass(warning.category, ReaderWarning):
            summary.warnings.append(str(warning.message))
        else:  # not ours to swallow
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if reason is not None:
        summary.skipped.append((name, reason))
    return documents


def _nothing_written(sources: Sequence[str | Path], summary: IngestSummary) -> str:
    names = ", ".join(map(str, sources))
    if not summary.skipped and not summary.duplicates:
        return f"{names}: no documents found (supported: {', '.join(supported_extensions())})"
    reasons = [f"{path}: {reason}" for path, reason in summary.skipped[:5]]
    if len(summary.skipped) > 5:
        reasons.append(f"and {len(summary.skipped) - 5} more")
    return f"{names}: no text to write; {len(summary.skipped)} file(s) skipped ({'; '.join(reasons)})"


def _display(path: Path) -> str:
    """The path relative to the working folder when it lies inside it, else as given; '/' separated on every OS."""
    try:
        return Path(os.path.abspath(path)).relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.as_posix()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@contextmanager
def _file_progress(total: int, *, enabled: bool) -> Iterator[Callable[[str], None]]:
    """A transient progress bar on stderr; yields `advance(name)`, called as each file starts."""
    if not enabled or total == 0:
        yield lambda name: None
        return
    columns = (TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[name]}"))
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("ingest", total=total, name="")
        started = False

        def advance(name: str) -> None:
            nonlocal started
            bar.update(task, advance=1 if started else 0, name=name)
            started = True

        yield advance
        bar.update(task, completed=total)
