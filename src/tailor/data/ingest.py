"""The ingest stage: document files in, `corpus.jsonl` out (one record per chunk, with where it came from).

read (readers/, by extension) -> normalize (clean.py) -> personal data (pii.py, when asked) -> drop exact and
near duplicates (dedup.py) -> chunk (chunk.py) -> write.

Personal data is replaced before deduplication, so two copies that differ only in a redacted phone number count
as the same document, and before chunking, so no chunk can carry half of an email address past the redactor.

One bad file never stops the batch: it is listed in `IngestSummary.skipped` with the reason and the rest goes on.
The corpus is written atomically, so a run that fails leaves the previous `corpus.jsonl` as it was.

With `workers` > 1, reading and normalizing (the per-file work) runs in worker processes; results are taken in file
order, and everything that needs the whole corpus - pseudonyms consistent across files, boilerplate, duplicates -
stays in this process, so the corpus is the same bytes for any number of workers. Memory is bounded by the record,
not the corpus: text files stream in records of at most `max_record_chars`, a file's documents beyond SPOOL_CHARS
wait on disk, and the second pass reads the spooled documents back one at a time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import tempfile
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from tailor.config import IngestConfig
from tailor.data.chunk import chunk_text
from tailor.data.clean import detect_language, line_key, normalize_text, quality_problem, remove_lines
from tailor.data.dedup import Cluster, Deduplicator
from tailor.data.pii import PiiRedactor
from tailor.data.readers import ReaderOptions, ReaderWarning, extension_of, read_document, supported_extensions
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


def ingest(sources: Sequence[str | Path], output: Path | str, options: IngestConfig | None = None, *,
           source_names: dict[str, str] | None = None, progress: bool = True, **settings: Any) -> IngestSummary:
    """Read every supported file under `sources` into chunk records written to `output` (JSON lines).

    Folders are searched recursively in sorted order; hidden files and folders (`.git`, `.DS_Store`) are ignored.
    Each record: id, text, source, page, line, chunk, char_start, char_end (offsets in the normalized document or
    page, after personal data was replaced), sha256 (of the chunk text), doc_sha256 (of the whole normalized
    document, page or record), title; chat transcripts give one record per conversation, with its `messages`.
    `line` is the line, row or record number a record-file document (CSV, JSON lines, JSON) starts at.

    `options`: the `ingest:` section of tailor.yaml (chunk sizes, personal data, deduplication, cleaning, workers;
    its defaults when None); keyword `settings` replace single values of it (`chunk_chars=120`), checked the same
    way. `source_names`: file path -> the name its records get as `source` (a crawled page's URL).
    """
    options = (options or IngestConfig()).updated("ingest", **settings)
    chunk_chars, chunk_overlap, min_chars, pii = (options.chunk_chars, options.chunk_overlap, options.min_chars,
                                                  options.pii)
    cleaning = Cleaning(boilerplate_min_docs=options.boilerplate_min_docs, boilerplate_share=options.boilerplate_share,
                        max_symbol_ratio=options.max_symbol_ratio, max_repeated_ngrams=options.max_repeated_ngrams,
                        languages=tuple(options.languages))
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise TailorError("ingest: no sources given (name document files or folders)")
    chunk_text("", chunk_chars, chunk_overlap)  # rejects bad sizes before any file is read
    # both reject bad options here, before any file is read
    redactor = PiiRedactor(pii, keep=options.pii_keep) if pii else None
    from tailor.data.chatlog import check_speaker_roles

    reading = ReaderOptions(text_field=options.text_field, speaker_roles=check_speaker_roles(options.speaker_roles),
                            max_record_chars=options.max_record_chars)
    names = {os.path.realpath(path): name for path, name in (source_names or {}).items()}
    dedup = Deduplicator(options.near_dup_threshold)
    output = Path(output)
    files, skipped = _collect_files(sources, exclude=output)
    summary = IngestSummary(skipped=skipped, output=str(output), pii_mode=pii)
    with _file_progress(len(files), enabled=progress) as advance:
        records = _records(files, summary, sources, chunk_chars=chunk_chars, chunk_overlap=chunk_overlap,
                           min_chars=min_chars, redactor=redactor, dedup=dedup, advance=advance, options=reading,
                           cleaning=cleaning, names=names, workers=options.workers)
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
    files, skipped = [], []
    for path in candidates:
        if chosen.get(os.path.realpath(path)) is not path:
            continue
        if extension_of(path) is not None:
            files.append(path)
        else:
            kind = f"'{path.suffix.lower()}'" if path.suffix else "no extension"
            skipped.append((_display(path), f"unsupported file type ({kind})"))
    return files, skipped


def _records(files: list[Path], summary: IngestSummary, sources: Sequence[str | Path], *, chunk_chars: int,
             chunk_overlap: int, min_chars: int, redactor: PiiRedactor | None, dedup: Deduplicator,
             advance: Callable[[str], None], options: ReaderOptions, cleaning: Cleaning,
             names: dict[str, str], workers: int) -> Iterator[dict]:
    written = 0
    try:
        with tempfile.TemporaryDirectory(prefix="tailor-ingest-") as spool_dir:
            # a partial of a module-level function: picklable, so worker processes can run it
            read = functools.partial(read_normalized, options=options, spool_dir=spool_dir,
                                     detect=cleaning.detect_language)
            texts = _read_files(files, names, read, workers, advance)
            documents = _file_records(texts, summary, min_chars=min_chars, redactor=redactor)
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


# --- per file: read and normalize, in this process or in worker processes ---------------------------------------------

@dataclass
class FileText:
    """One file's documents, normalized (what a worker sends back), or why the file was skipped.

    A file's documents stay in memory up to SPOOL_CHARS characters and go to a temporary JSON-lines file beyond,
    so a huge file costs disk, not memory; a file that fails half-way is dropped whole, never as a fragment."""
    path: str
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    documents: list[dict] = field(default_factory=list)
    spool: str | None = None
    _chars: int = 0

    def add(self, document: dict, spool_dir: str) -> None:
        if self.spool is None and self._chars + len(document["text"]) <= SPOOL_CHARS:
            self.documents.append(document)
            self._chars += len(document["text"])
            return
        if self.spool is None:
            handle, self.spool = tempfile.mkstemp(dir=spool_dir, suffix=".jsonl")
            os.close(handle)
        with open(self.spool, "a", encoding="utf-8") as out:
            out.write(json.dumps(document, ensure_ascii=False) + "\n")

    def discard(self) -> None:
        self.documents = []
        if self.spool is not None:
            os.unlink(self.spool)
            self.spool = None

    def __iter__(self) -> Iterator[dict]:
        yield from self.documents
        if self.spool is not None:
            try:
                with open(self.spool, encoding="utf-8") as spooled:
                    for line in spooled:
                        yield json.loads(line)
            finally:
                self.discard()


# A file's documents beyond this many characters are spooled to disk (see FileText).
SPOOL_CHARS = 4_000_000


def read_normalized(path: str, name: str, *, options: ReaderOptions, spool_dir: str, detect: bool) -> FileText:
    """Read one file into normalized documents. Runs in worker processes: it only reads, normalizes and (`detect`)
    guesses each document's language, which the parent reuses when it leaves the text unchanged; everything that
    needs the whole corpus (personal-data pseudonyms, boilerplate, duplicates) happens in the parent."""
    result = FileText(path)
    reason = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReaderWarning)
        try:
            for document in read_document(Path(path), options):
                messages = None if document.messages is None else [
                    dict(message, content=normalize_text(message["content"])) for message in document.messages]
                text = normalize_text(document.text)
                result.add({"text": text, "page": document.page, "line": document.line, "column": document.column,
                            "title": document.title, "messages": messages,
                            **({"lang": detect_language(text)} if detect else {})}, spool_dir)
        except TailorError as exc:
            reason = str(exc).removeprefix(f"{path}: ").removeprefix(f"{name}: ")
        except Exception as exc:  # noqa: BLE001 - a library choking on one odd file must not end the batch
            reason = f"could not read ({type(exc).__name__}: {exc})"
    for warning in caught:
        if issubclass(warning.category, ReaderWarning):
            result.warnings.append(str(warning.message))
        else:  # not ours to swallow
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if reason is not None:
        result.discard()
        result.reason = reason
    return result


def _read_files(files: list[Path], names: dict[str, str], read: Callable[[str, str], FileText], workers: int,
                advance: Callable[[str], None]) -> Iterator[tuple[str, FileText]]:
    """(name, FileText) for every file, in the order of `files` whatever the number of workers, so the corpus is
    the same bytes with 1 or N workers."""
    jobs = [(_display(path), names.get(os.path.realpath(path)) or _display(path)) for path in files]
    if workers == 1 or len(jobs) < 2:
        for path, name in jobs:
            advance(name)
            # read under the short name, so readers' messages name the file as the summary does
            yield name, read(path, name)
        return
    # spawn, not fork: the parent runs a progress-bar thread, and forking a threaded process can deadlock
    context = multiprocessing.get_context("spawn")
    window = 4 * workers  # files read ahead: keeps workers busy while memory holds only a few files' text
    pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context)
    pending: deque = deque()
    next_job = 0
    try:
        while pending or next_job < len(jobs):
            while len(pending) < window and next_job < len(jobs):
                path, name = jobs[next_job]
                pending.append((path, name, pool.submit(read, path, name)))
                next_job += 1
            path, name, future = pending.popleft()
            advance(name)
            try:
                yield name, future.result()
            except BrokenProcessPool:
                # A worker died (a crash inside a parsing library, or killed for memory). Which file did it is
                # unknown, so this file and those in flight are read again, each alone, and only that file is lost.
                pool.shutdown(cancel_futures=True)
                yield name, _read_alone(read, path, name, context)
                for path, name, _ in pending:
                    advance(name)
                    yield name, _read_alone(read, path, name, context)
                pending.clear()
                pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context)
    finally:
        pool.shutdown(cancel_futures=True)


def _read_alone(read: Callable[[str, str], FileText], path: str, name: str, context) -> FileText:
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(read, path, name).result()
        except BrokenProcessPool:
            return FileText(path, reason="the process reading it stopped abruptly (a crash in a parsing library, "
                                         "or out of memory)")


def _file_records(texts: Iterator[tuple[str, FileText]], summary: IngestSummary, *, min_chars: int,
                  redactor: PiiRedactor | None) -> Iterator[dict]:
    """Documents of every readable file, personal data replaced (here, in one process, so a pseudonym is the same
    in every file); files without usable text go to `summary.skipped`."""
    for name, text_of_file in texts:
        summary.warnings += text_of_file.warnings
        if text_of_file.reason is not None:
            summary.skipped.append((name, text_of_file.reason))
            continue
        any_text, longest, too_short, kept = False, 0, [], 0
        for document in text_of_file:
            text = document["text"]
            if redactor is not None:
                text = redactor.apply(text)[0]
                if text != document["text"]:
                    document.pop("lang", None)  # guessed on the text before; guessed again on this one
            any_text = any_text or bool(text)
            if len(text) < min_chars:
                longest = max(longest, len(text))
                if text:
                    too_short.append(str(document["page"]) if document["line"] is None
                                     else f"line {document['line']}")
                continue
            label = name if document["page"] is None else f"{name} (page {document['page']})"
            label = label if document["line"] is None else f"{name}:{document['line']}"
            label = label if document["column"] is None else f"{label}:{document['column']}"
            title = document["title"]
            if redactor is not None and title:
                title = redactor.apply(title)[0]
            messages = document["messages"]
            if redactor is not None and messages is not None:
                messages = [dict(m, content=redactor.apply(m["content"])[0]) for m in messages]
            kept += 1
            yield {"label": label, "source": name, "page": document["page"], "line": document["line"],
                   "column": document["column"], "title": title, "text": text, "messages": messages,
                   **({"lang": document["lang"]} if "lang" in document else {})}
        if not any_text:
            empty = os.path.getsize(text_of_file.path) == 0
            summary.skipped.append((name, "empty file" if empty else "no text found"))
        elif not kept:
            summary.skipped.append((name, f"only {longest} characters of text (min_chars={min_chars})"))
        else:
            summary.files_read += 1
            if too_short:
                kind = "page" if too_short[0][0].isdigit() else "record"
                summary.warnings.append(f"{name}: {kind}{'s' if len(too_short) > 1 else ''} "
                                        f"{', '.join(too_short[:10])}{' …' if len(too_short) > 10 else ''} shorter "
                                        f"than min_chars={min_chars}; dropped")


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
                        document.pop("lang", None)  # the text changed: its language is guessed again below
                    if len(text) < min_chars:
                        summary.filtered.append((label, "only lines repeated across documents (menus, footers)"))
                        continue
                problem = quality_problem(text, max_symbol_ratio=cleaning.max_symbol_ratio,
                                          max_repeated_ngrams=cleaning.max_repeated_ngrams)
                if problem is not None:
                    summary.filtered.append((label, problem))
                    continue
            lang = None
            if cleaning.detect_language:
                lang = document["lang"] if "lang" in document else detect_language(text)
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
            # records cut from one very long line of a text file are told apart by their column
            place = f"{name}\0{document['page'] or ''}" + (f"\0{document['line']}" if document["line"] is not None
                                                           else "") \
                + (f"\0:{document['column']}" if document["column"] is not None else "")
            if document["messages"] is not None:  # a conversation stays whole: a chunk of one is no conversation
                yield {"id": _sha256(f"{place}\00")[:16], "text": text, **base, "chunk": 0, "char_start": 0,
                       "char_end": len(text), "sha256": _sha256(text), "messages": document["messages"]}
                continue
            chunks = [chunk for chunk in chunk_text(text, chunk_chars, chunk_overlap) if len(chunk[2]) >= min_chars]
            for index, (start, end, chunk) in enumerate(chunks):
                yield {"id": _sha256(f"{place}\0{index}")[:16], "text": chunk, **base, "chunk": index,
                       "char_start": start, "char_end": end, "sha256": _sha256(chunk)}


def _nothing_written(sources: Sequence[str | Path], summary: IngestSummary) -> str:
    names = ", ".join(map(str, sources))
    if summary.filtered and not summary.skipped:
        label, reason = summary.filtered[0]
        more = f" and {len(summary.filtered) - 1} more" if len(summary.filtered) > 1 else ""
        return f"{names}: no text to write; every document was filtered out ({label}: {reason}{more})"
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
