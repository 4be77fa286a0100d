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
import json
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from tailor.data.chunk import chunk_text
from tailor.data.clean import detect_language, line_key, normalize_text, quality_problem, remove_lines
from tailor.data.dedup import Cluster, Deduplicator
from tailor.data.pii import PiiRedactor
from tailor.data.readers import Document, ReaderOptions, ReaderWarning, read_document, supported_extensions
from tailor.errors import TailorError
from tailor.workspace import write_jsonl


# Shorter lines are section headings ("Fees", "How to apply") as often as boilerplate: they stay.
MIN_BOILERPLATE_CHARS = 15


@dataclass(frozen=True)
class Cleaning:
    """Corpus-level cleaning after reading (ingest.* in tailor.yaml)."""
    boilerplate_min_docs: int = 3  # a line in at least this many documents (and boilerplate_share of them) goes; 0: off
    boilerplate_share: float = 0.05
    max_symbol_ratio: float = 0.35  # documents with a larger share of non-alphanumeric characters are dropped
    max_repeated_ngrams: float = 0.5  # documents (50+ words) with a larger share of repeated word 3-grams are dropped
    detect_language: bool = True  # `lang` on every record
    languages: tuple[str, ...] = ()  # keep only these languages (empty: all)


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
    filtered: list[tuple[str, str]] = field(default_factory=list)  # (document, reason): quality or language
    boilerplate_lines: int = 0  # lines removed as repeated across documents
    languages: dict[str, int] = field(default_factory=dict)  # documents kept, by detected language
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
            "filtered": [{"document": label, "reason": reason} for label, reason in self.filtered],
            "boilerplate_lines_removed": self.boilerplate_lines,
            "languages": dict(self.languages),
            "warnings": list(self.warnings),
        }


def ingest(sources: Sequence[str | Path], output: Path | str, *, chunk_chars: int = 1500, chunk_overlap: int = 200,
           min_chars: int = 20, pii: str | None = None, pii_keep: Sequence[str] = (),
           near_dup_threshold: float | None = 0.85, text_field: str | None = None,
           speaker_roles: dict[str, str] | None = None, cleaning: Cleaning | None = None,
           source_names: dict[str, str] | None = None, progress: bool = True) -> IngestSummary:
    """Read every supported file under `sources` into chunk records written to `output` (JSON lines).

    Folders are searched recursively in sorted order; hidden files and folders (`.git`, `.DS_Store`) are ignored.
    Each record: id, text, source, page, line, chunk, char_start, char_end (offsets in the normalized document or
    page, after personal data was replaced), sha256 (of the chunk text), doc_sha256 (of the whole normalized
    document, page or record), title; chat transcripts give one record per conversation, with its `messages`.
    `line` is the line, row or record number a record-file document (CSV, JSON lines, JSON) starts at.

    `text_field`: the field of JSON/CSV records that holds the text (default: text, content, body, ...);
    `speaker_roles`: chat-log speaker name -> user/assistant/system.
    `cleaning`: boilerplate-line removal, quality and language filters (see `Cleaning`).
    `source_names`: file path -> the name its records get as `source` (a crawled page's URL).

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
    from tailor.data.chatlog import check_speaker_roles

    options = ReaderOptions(text_field=text_field, speaker_roles=check_speaker_roles(speaker_roles or {}))
    names = {os.path.realpath(path): name for path, name in (source_names or {}).items()}
    dedup = Deduplicator(near_dup_threshold)
    output = Path(output)
    files, skipped = _collect_files(sources, exclude=output)
    summary = IngestSummary(skipped=skipped, output=str(output), pii_mode=pii)
    with _file_progress(len(files), enabled=progress) as advance:
        records = _records(files, summary, sources, chunk_chars=chunk_chars, chunk_overlap=chunk_overlap,
                           min_chars=min_chars, redactor=redactor, dedup=dedup, advance=advance, options=options,
                           cleaning=cleaning or Cleaning(), names=names)
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
             advance: Callable[[str], None], options: ReaderOptions, cleaning: Cleaning,
             names: dict[str, str]) -> Iterator[dict]:
    written = 0
    try:
        documents = _file_records(files, summary, chunk_chars=chunk_chars, chunk_overlap=chunk_overlap,
                                  min_chars=min_chars, redactor=redactor, dedup=dedup, advance=advance,
                                  options=options, names=names)
        for record in _clean_records(documents, summary, chunk_chars=chunk_chars, chunk_overlap=chunk_overlap,
                                     min_chars=min_chars, dedup=dedup, cleaning=cleaning):
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
                  advance: Callable[[str], None], options: ReaderOptions, names: dict[str, str]) -> Iterator[dict]:
    for path in files:
        name = names.get(os.path.realpath(path)) or _display(path)
        advance(name)
        # read under the short name, so readers' messages name the file as the summary does
        documents = _read_file(Path(_display(path)), name, summary, options)
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
            label = label if document.line is None else f"{name}:{document.line}"
            if len(text) < min_chars:
                too_short.append(str(document.page) if document.line is None else f"line {document.line}")
                continue
            title = redactor.apply(document.title)[0] if redactor is not None and document.title else document.title
            messages = None
            if document.messages is not None:
                messages = [dict(message, content=normalize_text(message["content"])) for message in
                            document.messages]
                if redactor is not None:
                    messages = [dict(m, content=redactor.apply(m["content"])[0]) for m in messages]
            yield {"label": label, "source": name, "page": document.page, "line": document.line, "title": title,
                   "text": text, "messages": messages}
        if too_short:
            kind = "page" if too_short[0][0].isdigit() else "record"
            summary.warnings.append(f"{name}: {kind}{'s' if len(too_short) > 1 else ''} {', '.join(too_short[:10])}"
                                    f"{' …' if len(too_short) > 10 else ''} shorter than min_chars={min_chars}; "
                                    f"dropped")


def _clean_records(documents: Iterator[dict], summary: IngestSummary, *, chunk_chars: int, chunk_overlap: int,
                   min_chars: int, dedup: Deduplicator, cleaning: Cleaning) -> Iterator[dict]:
    """Second pass: boilerplate lines out, quality and language filters, duplicates, chunks.

    Boilerplate is a line found in many documents (a site's menu, a PDF's running footer), which only the whole
    corpus shows; so the first pass spools the documents to a temporary file while counting, in how many
    documents each line occurs, and this pass reads them back: one read of every source, memory bounded by the
    largest document and the line counts.
    """
    with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        line_docs: Counter = Counter()  # hash of a line -> documents holding it
        count = 0
        for document in documents:
            if document["messages"] is None:
                line_docs.update({hash(key) for key in map(line_key, document["text"].split("\n"))
                                  if len(key) >= MIN_BOILERPLATE_CHARS})
            spool.write(json.dumps(document, ensure_ascii=False) + "\n")
            count += 1
        floor = max(cleaning.boilerplate_min_docs, cleaning.boilerplate_share * count)
        boilerplate = {key for key, docs in line_docs.items() if docs >= floor} if cleaning.boilerplate_min_docs \
            else set()
        del line_docs
        spool.seek(0)
        for raw in spool:
            document = json.loads(raw)
            label, text = document["label"], document["text"]
            if document["messages"] is None:
                if boilerplate:
                    removed = sum(1 for line in text.split("\n") if hash(line_key(line)) in boilerplate)
                    if removed:
                        summary.boilerplate_lines += removed
                        text = remove_lines(text, lambda key: hash(key) in boilerplate)
                    if len(text) < min_chars:
                        summary.filtered.append((label, "only lines repeated across documents (menus, footers)"))
                        continue
                problem = quality_problem(text, max_symbol_ratio=cleaning.max_symbol_ratio,
                                          max_repeated_ngrams=cleaning.max_repeated_ngrams)
                if problem is not None:
                    summary.filtered.append((label, problem))
                    continue
            lang = detect_language(text) if cleaning.detect_language else None
            if cleaning.languages and lang not in cleaning.languages:
                summary.filtered.append((label, f"language {lang or 'unknown'} (ingest.languages: "
                                                f"{', '.join(cleaning.languages)})"))
                continue
            if dedup.check(label, text) is not None:
                continue
            summary.documents += 1
            if lang:
                summary.languages[lang] = summary.languages.get(lang, 0) + 1
            name = document["source"]
            base = {"source": name, "page": document["page"], "line": document["line"], "doc_sha256": _sha256(text),
                    "title": document["title"]}
            if cleaning.detect_language:
                base["lang"] = lang
            place = f"{name}\0{document['page'] or ''}" + (f"\0{document['line']}" if document["line"] is not None
                                                           else "")
            if document["messages"] is not None:  # a conversation stays whole: a chunk of one is no conversation
                yield {"id": _sha256(f"{place}\00")[:16], "text": text, **base, "chunk": 0, "char_start": 0,
                       "char_end": len(text), "sha256": _sha256(text), "messages": document["messages"]}
                continue
            chunks = [chunk for chunk in chunk_text(text, chunk_chars, chunk_overlap) if len(chunk[2]) >= min_chars]
            for index, (start, end, chunk) in enumerate(chunks):
                yield {"id": _sha256(f"{place}\0{index}")[:16], "text": chunk, **base, "chunk": index,
                       "char_start": start, "char_end": end, "sha256": _sha256(chunk)}


def _read_file(path: Path, name: str, summary: IngestSummary, options: ReaderOptions) -> list[Document] | None:
    """All documents of one file, or None (with the reason in summary.skipped) when it cannot be read."""
    documents, reason = None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReaderWarning)
        try:
            # whole file at once: a file that fails half-way contributes nothing rather than a fragment
            documents = list(read_document(path, options))
        except TailorError as exc:
            reason = str(exc).removeprefix(f"{path}: ").removeprefix(f"{name}: ")
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
