"""Ingest at scale and on awkward input: worker processes, bounded memory on huge files, mixed encodings, gzip'd
documents and the per-file messages of the final summary."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest

from tailor.data import ingest as ingest_module
from tailor.data.ingest import ingest
from tailor.data.readers import ReaderOptions, ReaderWarning, read_document
from tailor.errors import TailorError
from tests.unit.data.test_ingest import GOOD_TEXT, PAGE_HTML, make_pdf, read_records


def reader_notes(path: Path, options: ReaderOptions | None = None) -> tuple[list, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        documents = list(read_document(path, options))
    return documents, [str(w.message) for w in caught if issubclass(w.category, ReaderWarning)]


# --- workers ----------------------------------------------------------------------------------------------------------

def test_workers_write_the_same_corpus_and_isolate_failures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    docs = Path("docs")
    docs.mkdir()
    (docs / "library.txt").write_text(GOOD_TEXT + "\nQuestions: ana.lopez@mail-maplewood.org or 555-201-7788.\n",
                                      encoding="utf-8")
    (docs / "pool.html").write_text(PAGE_HTML, encoding="utf-8")
    (docs / "parks.md").write_text("# Parks\n\nThe rose garden is open from April to October. Write to "
                                   "ana.lopez@mail-maplewood.org for a group visit.\n", encoding="utf-8")
    make_pdf(docs / "permits.pdf", ["Building permits are reviewed within ten business days.",
                                    "A fence taller than six feet needs a permit."])
    (docs / "binary.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" * 50)
    whole = (docs / "permits.pdf").read_bytes()
    (docs / "broken.pdf").write_bytes(whole[: len(whole) // 3])
    (docs / "old.txt").write_bytes("Le café est ouvert à midi, les règles sont affichées à l'entrée.".encode(
        "cp1252"))
    advanced: list[str] = []

    @contextmanager
    def recording_progress(total, enabled):
        yield advanced.append

    summaries = {}
    for workers in (1, 2):
        if workers == 2:
            monkeypatch.setattr(ingest_module, "_file_progress", recording_progress)
        summaries[workers] = ingest(["docs"], f"corpus{workers}.jsonl", chunk_chars=150, chunk_overlap=30,
                                    pii="pseudonymize", workers=workers, progress=True)
    assert Path("corpus1.jsonl").read_bytes() == Path("corpus2.jsonl").read_bytes()
    one, two = summaries[1].to_dict(), summaries[2].to_dict()
    assert {**one, "output": None} == {**two, "output": None}
    reasons = dict(summaries[2].skipped)
    assert reasons["docs/binary.txt"].startswith("binary data")
    assert reasons["docs/broken.pdf"].startswith("damaged, truncated or not a PDF")
    assert summaries[2].files_read == 5 and summaries[2].pii_counts["EMAIL"] == 2
    assert any(w.startswith("docs/old.txt: not valid UTF-8") for w in summaries[2].warnings)
    records = read_records(Path("corpus2.jsonl"))
    # one pseudonym for one address, in every file, whichever worker read it
    fakes = {word for r in records for word in r["text"].split() if "@example.com" in word}
    assert "ana.lopez@mail-maplewood.org" not in Path("corpus2.jsonl").read_text(encoding="utf-8") and len(fakes) == 1
    assert advanced == sorted(advanced) and len(advanced) == 7  # the bar moves once per file, in order


def test_workers_must_be_positive(tmp_path):
    (tmp_path / "a.txt").write_text(GOOD_TEXT, encoding="utf-8")
    with pytest.raises(TailorError, match=r"ingest.workers: Input should be greater than or equal to 1 \(found 0\)"):
        ingest([tmp_path / "a.txt"], tmp_path / "c.jsonl", workers=0, progress=False)


# --- bounded memory ---------------------------------------------------------------------------------------------------

def test_long_text_files_are_cut_into_bounded_records_with_their_line(tmp_path):
    topics = ["parking fees", "the new library wing", "snow removal", "park benches", "bus shelters", "recycling",
              "street lights", "the farmers market", "dog parks", "school crossings", "tree planting", "bike lanes"]
    paragraphs = [f"Paragraph {n}: the council discussed {topics[n % 12]} with {topics[(n * 5 + 3) % 12]} and "
                  f"voted {n * 7 % 13} to {n % 5} on item {n}." for n in range(200)]
    path = tmp_path / "minutes.txt"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    documents, notes = reader_notes(path, ReaderOptions(max_record_chars=1000))
    assert not notes and len(documents) > 10
    assert all(len(d.text) <= 1000 for d in documents)
    assert "".join(d.text for d in documents) == path.read_text(encoding="utf-8")  # nothing lost, nothing twice
    assert all(d.text.startswith("Paragraph ") for d in documents)  # cut at paragraph breaks
    for document in documents:  # `line` says where each record starts
        first = document.text.split(":")[0]
        assert (path.read_text(encoding="utf-8").split("\n")[document.line - 1]).startswith(first)
        assert document.column is None  # each starts a line
    # long lines of words are cut at spaces, each record starting at its line and column
    (tmp_path / "line.txt").write_text("short first line\n" + "word " * 1000, encoding="utf-8")
    line_docs, _ = reader_notes(tmp_path / "line.txt", ReaderOptions(max_record_chars=1000))
    assert [(d.line, d.column) for d in line_docs] == [(1, None), (2, None), (2, 1001), (2, 2001), (2, 3001),
                                                        (2, 4001)]
    assert "".join(d.text for d in line_docs) == "short first line\n" + "word " * 1000
    words = " ".join(f"word{number}" for number in range(1000))  # one line, records all different
    (tmp_path / "words.txt").write_text(words, encoding="utf-8")
    summary = ingest([tmp_path / "words.txt"], tmp_path / "words.jsonl", max_record_chars=1000, progress=False)
    records = read_records(tmp_path / "words.jsonl")
    assert summary.documents == len(words) // 1000 + 1 and {r["line"] for r in records} == {1}
    assert len({r["id"] for r in records}) == len(records)  # one line, yet every record its own id
    (tmp_path / "blob.txt").write_text("QUJD" * 1000, encoding="utf-8")
    with pytest.raises(TailorError, match=r"blob\.txt: no line break or space in 1,000 characters"):
        list(read_document(tmp_path / "blob.txt", ReaderOptions(max_record_chars=1000)))
    # in the corpus, each record is its own document with its own ids
    summary = ingest([path], tmp_path / "c.jsonl", max_record_chars=1000, progress=False)
    records = read_records(tmp_path / "c.jsonl")
    assert summary.documents == len(documents) and len({r["id"] for r in records}) == len(records)
    assert {r["line"] for r in records} == {d.line for d in documents}


_MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from tailor.data.ingest import Cleaning, ingest
    from tailor.data.readers import ReaderOptions, read_document

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    ingest(["batch/good.txt"], "warm.jsonl", progress=False)  # every module imported, every stage run once
    baseline = peak_mb()
    parts = sum(1 for _ in read_document(Path("words.txt"), ReaderOptions()))
    after_read = peak_mb()
    summary = ingest(["batch"], "corpus.jsonl", progress=False)
    print(json.dumps({"baseline": baseline, "after_read": after_read, "after_ingest": peak_mb(), "parts": parts,
                      "skipped": summary.skipped, "records": summary.records}))
""")


def test_a_200_mb_single_line_never_sits_in_memory_whole(tmp_path):
    size = 200 * 2**20
    words, blob = b"lorem ipsum dolor sit amet " * 40000, b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo" * 30000
    (tmp_path / "batch").mkdir()
    for name, block in (("words.txt", words), ("batch/blob.txt", blob)):
        with open(tmp_path / name, "wb") as out:  # one line, no newline anywhere
            for _ in range(size // len(block) + 1):
                out.write(block)
    (tmp_path / "batch" / "good.txt").write_text(GOOD_TEXT, encoding="utf-8")
    # measured inside a fresh interpreter: this test process's own peak says nothing about the reader
    result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    # the words line streams through as bounded records; the blob line is refused with one message
    assert figures["parts"] >= 200
    assert figures["after_read"] - figures["baseline"] < 150, figures
    assert figures["after_ingest"] - figures["baseline"] < 150, figures
    assert figures["skipped"] == [["batch/blob.txt", "no line break or space in 1,000,000 characters after "
                                   "character 0 (minified or encoded data, not prose; ingest.max_record_chars)"]]
    assert figures["records"] == 1  # good.txt (one chunk) still made it


# --- encodings --------------------------------------------------------------------------------------------------------

def test_mixed_encodings_are_decoded_with_a_note_for_every_guess(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    french = "Le café crème coûte 3 € — l'été, la terrasse de la mairie est ouverte à midi."
    russian = "Городская библиотека открыта с девяти утра до восьми вечера по будним дням."
    german = "Grüße aus Köln: das Bürgerbüro öffnet montags um acht Uhr, Straße gesperrt."
    files = {"utf8.txt": french.encode("utf-8"), "bom.txt": b"\xef\xbb\xbf" + french.encode("utf-8"),
             "utf16.txt": french.encode("utf-16"), "utf16be.txt": b"\xfe\xff" + german.encode("utf-16-be"),
             "cp1252.txt": french.encode("cp1252"), "latin1.txt": german.encode("latin-1"),
             "cp1251.txt": russian.encode("cp1251"),
             # a UTF-8 file with a latin-1 paragraph pasted in
             "mixed.txt": french.encode("utf-8") + b"\n\n" + german.encode("latin-1") + b"\n"}
    Path("docs").mkdir()
    for name, data in files.items():
        (Path("docs") / name).write_bytes(data)
    expected = {"utf8.txt": french, "bom.txt": french, "utf16.txt": french, "utf16be.txt": german,
                "cp1252.txt": french, "latin1.txt": german, "cp1251.txt": russian,
                "mixed.txt": french + "\n\n" + german}
    for name, text in expected.items():
        documents, notes = reader_notes(Path("docs") / name)
        assert [d.text.strip() for d in documents] == [text], name
        if name in ("utf8.txt", "bom.txt", "utf16.txt", "utf16be.txt"):
            assert not notes, (name, notes)
    # the same text in several encodings: boilerplate removal would take it all as a repeated line
    summary = ingest(["docs"], "corpus.jsonl", near_dup_threshold=None, boilerplate_min_docs=0,
                     progress=False)
    notes = {w.split(":")[0]: w for w in summary.warnings}
    assert set(notes) == {"docs/cp1252.txt", "docs/latin1.txt", "docs/cp1251.txt", "docs/mixed.txt"}
    assert notes["docs/cp1252.txt"].endswith("not valid UTF-8, decoded as cp1252")
    latin1_bytes = sum(ord(char) > 127 for char in german)  # the pasted paragraph's, and only those
    assert f"mixed encodings: {latin1_bytes} bytes not valid UTF-8 were decoded as cp1252" in notes["docs/mixed.txt"]
    assert "decoded as cp1251 (detected by charset-normalizer)" in notes["docs/cp1251.txt"]
    texts = {r["source"]: r["text"] for r in read_records(Path("corpus.jsonl"))}
    assert texts["docs/mixed.txt"] == french + "\n\n" + german and texts["docs/cp1251.txt"] == russian
    # decoded alike, the copies are exact duplicates of the first French (bom.txt) and German (latin1.txt) one
    assert sorted(summary.duplicates) == [("docs/cp1252.txt", "docs/bom.txt"), ("docs/utf16.txt", "docs/bom.txt"),
                                          ("docs/utf16be.txt", "docs/latin1.txt"), ("docs/utf8.txt", "docs/bom.txt")]


# --- gzip'd documents -------------------------------------------------------------------------------------------------

def test_gzipped_text_markdown_and_html_are_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("doc").mkdir()
    with gzip.open("doc/README.txt.gz", "wb") as out:
        out.write(GOOD_TEXT.encode("utf-8"))
    with gzip.open("doc/guide.md.gz", "wb") as out:
        out.write(b"# Parks\n\nThe rose garden is open from **April** to October, dogs on a leash welcome.\n")
    with gzip.open("doc/pool.html.gz", "wb") as out:
        out.write(PAGE_HTML.encode("utf-8"))
    Path("doc/broken.txt.gz").write_bytes(gzip.compress(GOOD_TEXT.encode())[:40])
    Path("doc/changelog.Debian.gz").write_bytes(gzip.compress(b"some changes"))
    summary = ingest(["doc"], "corpus.jsonl", progress=False)
    records = read_records(Path("corpus.jsonl"))
    assert {r["source"] for r in records} == {"doc/README.txt.gz", "doc/guide.md.gz", "doc/pool.html.gz"}
    text = "\n".join(r["text"] for r in records)
    assert "The rose garden is open from April to October" in text and "Season passes cost forty" in text
    assert "NAV-HOME" not in text and "**" not in text
    reasons = dict(summary.skipped)
    assert reasons["doc/broken.txt.gz"].startswith("damaged or truncated gzip file")
    assert reasons["doc/changelog.Debian.gz"] == "unsupported file type ('.gz')"


# --- the summary of bad input -----------------------------------------------------------------------------------------

def test_every_bad_file_gets_one_message_and_the_rest_continues(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("docs").mkdir()
    Path("docs/good.txt").write_text(GOOD_TEXT, encoding="utf-8")
    Path("docs/broken.html").write_text("<html><head><title>Fees</head><body><div><p>Parking permits cost twenty "
                                        "dollars a month <b>and renew <i>every January</div></p><table><tr><td>",
                                        encoding="utf-8")
    Path("docs/binary.html").write_bytes(b"\x00\x01GIF89a" * 100)
    Path("docs/image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    make_pdf(Path("docs/locked.pdf"), ["secret"], password="pw")
    Path("docs/empty").mkdir()
    summary = ingest(["docs"], "corpus.jsonl", progress=False)
    sources = {r["source"]: r["text"] for r in read_records(Path("corpus.jsonl"))}
    assert "Parking permits cost twenty dollars a month and renew every January" in sources["docs/broken.html"]
    reasons = dict(summary.skipped)
    assert set(reasons) == {"docs/binary.html", "docs/image.txt", "docs/locked.pdf"}
    assert reasons["docs/binary.html"].startswith("binary data") and reasons["docs/image.txt"].startswith("binary")
    assert summary.to_dict()["skipped"] == [{"path": p, "reason": r} for p, r in summary.skipped]
    with pytest.raises(TailorError, match=r"docs/empty: no documents found"):
        ingest(["docs/empty"], "other.jsonl", progress=False)


# --- PDFs typeset like TeX --------------------------------------------------------------------------------------------

def tex_like_pdf(lines: list[list[str]], space_width: int = 600) -> bytes:
    """A PDF whose word gaps are TJ pen moves, as TeX writes them (no space characters), in a font that declares a
    wide space glyph: pypdf then runs the words together, as it did on Debian Reference's PDF."""
    widths = " ".join(str(space_width if code == 32 else 500) for code in range(32, 127))
    content = "\n".join(f"BT /F1 11 Tf 72 {720 - 16 * number} Td [{' -250 '.join(f'({w})' for w in words)}] TJ ET"
                        for number, words in enumerate(lines)).encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 5 0 R >> >> "
               b"/Contents 4 0 R >>",
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content),
               f"<< /Type /Font /Subtype /Type1 /BaseFont /TeXGyreTermes /FirstChar 32 /LastChar 126 "
               f"/Widths [{widths}] /Encoding /WinAnsiEncoding >>".encode()]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_pdf_word_gaps_made_by_pen_moves_are_kept(tmp_path):
    from pypdf import PdfReader

    path = tmp_path / "reference.pdf"
    path.write_bytes(tex_like_pdf([["Here", "are", "a", "few", "basic", "methods"],
                                   ["to", "gain", "the", "root", "shell", "prompt."]]))
    assert "Hereareafew" in PdfReader(path).pages[0].extract_text()  # the failure this reader avoids
    documents, notes = reader_notes(path)
    assert [d.text for d in documents] == ["Here are a few basic methods\nto gain the root shell prompt."]
    assert not notes


def test_record_files_share_the_decoding_and_the_line_bound(tmp_path, monkeypatch):
    from tailor.data.readers import records, text

    # Excel's "Unicode text" export is UTF-16 with a byte-order mark
    (tmp_path / "excel.tsv").write_bytes("office\thours\nClerk\tLundi à vendredi, 9–17 h\n".encode("utf-16"))
    (tmp_path / "mixed.csv").write_bytes("office,hours\nCafé,8–16\n".encode() + "Bürger,9–12\n".encode(
        "cp1252"))
    excel, notes = reader_notes(tmp_path / "excel.tsv")
    assert [d.text for d in excel] == ["office: Clerk\nhours: Lundi à vendredi, 9–17 h"] and not notes
    mixed, notes = reader_notes(tmp_path / "mixed.csv")
    assert [d.text for d in mixed] == ["office: Café\nhours: 8–16", "office: Bürger\nhours: 9–12"]
    assert notes == [f"{tmp_path / 'mixed.csv'}: mixed encodings: 2 bytes not valid UTF-8 were decoded as cp1252, "
                     f"the rest as UTF-8"]
    monkeypatch.setattr(records, "MAX_LINE_CHARS", 1000)
    monkeypatch.setattr(text, "MAX_LINE_CHARS", 1000)
    (tmp_path / "dump.jsonl").write_text('{"text": "ok"}\n{"text": "' + "x" * 5000 + '"}\n', encoding="utf-8")
    (tmp_path / "dump.csv").write_text("text\n" + "y" * 5000, encoding="utf-8")
    with pytest.raises(TailorError, match=r"dump\.jsonl:2: a line longer than 1,000 bytes"):
        list(read_document(tmp_path / "dump.jsonl"))
    with pytest.raises(TailorError, match=r"dump\.csv: a line longer than 1,000 characters"):
        list(read_document(tmp_path / "dump.csv"))


def test_cli_ingest_with_workers_prints_every_skipped_file_and_note(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tailor.cli.app import app

    monkeypatch.chdir(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "library.txt").write_text(GOOD_TEXT, encoding="utf-8")
    (docs / "pool.html").write_text(PAGE_HTML, encoding="utf-8")
    (docs / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (docs / "old.txt").write_bytes("Le café est ouvert à midi et les règles sont affichées.".encode("cp1252"))
    command = ["ingest", "docs", "-o", "corpus.jsonl", "--no-progress"]
    result = CliRunner().invoke(app, [*command, "--workers", "2"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # rich wraps long lines
    assert "ingested 3 files" in output and "skipped docs/image.txt: binary data (contains NUL bytes)" in output
    assert "warning docs/old.txt: not valid UTF-8, decoded as cp1252" in output
    assert len(read_records(tmp_path / "corpus.jsonl")) == 3
    (tmp_path / "tailor.yaml").write_text("ingest:\n  workers: 0\n", encoding="utf-8")
    bad = CliRunner().invoke(app, command)  # the program prints a TailorError as one line (tailor.cli.app.main)
    assert isinstance(bad.exception, TailorError) and str(bad.exception).startswith("tailor.yaml: ingest.workers: ")
