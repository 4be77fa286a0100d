"""The ingest stage: readers, normalization, chunking and the corpus writer, on small files made at test time."""

from __future__ import annotations

import hashlib
import json
import warnings
from itertools import pairwise
from pathlib import Path

import pytest
from fpdf import FPDF

from tailor.config import validate_config
from tailor.data.chunk import chunk_text
from tailor.data.clean import normalize_text
from tailor.data.ingest import IngestSummary, ingest
from tailor.data.readers import ReaderWarning, read_document, reader_for, register_reader
from tailor.errors import TailorError

GOOD_TEXT = ("The library opens at nine in the morning on weekdays. Books can be renewed online or by phone.\n\n"
             "Late fees are waived for children's books. The reading room closes at eight in the evening.\n")

PAGE_HTML = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Pool Hours | City</title>
<style>body { color: red; }</style><script>var trackingSecret = "SCRIPT-TEXT";</script></head>
<body>
<header><div class="logo">HEADER-BANNER City of Maplewood</div></header>
<nav><ul><li><a href="/">NAV-HOME</a></li><li><a href="/pay">NAV-PAY-A-BILL</a></li></ul></nav>
<main>
  <h1>Pool hours</h1>
  <p>The municipal pool opens on the first of June and closes on Labor Day. Lap swimming is available
  every weekday morning from six to eight, and families can swim on weekend afternoons.</p>
  <p>Season passes cost forty dollars for residents and can be bought at the recreation center front desk.</p>
</main>
<aside>ASIDE-RELATED-LINKS</aside>
<footer>FOOTER-COPYRIGHT 2024 City of Maplewood</footer>
<script>console.log("SCRIPT-BOTTOM")</script>
</body></html>
"""
BOILERPLATE = ["SCRIPT-TEXT", "HEADER-BANNER", "NAV-HOME", "NAV-PAY-A-BILL", "ASIDE-RELATED", "FOOTER-COPYRIGHT",
               "SCRIPT-BOTTOM", "color: red"]


def make_pdf(path: Path, pages: list[str], title: str | None = None, password: str | None = None) -> Path:
    pdf = FPDF()
    pdf.set_font("Helvetica", size=12)
    for text in pages:
        pdf.add_page()
        if text:
            pdf.multi_cell(0, 8, text)
    if title:
        pdf.set_title(title)
    if password:
        pdf.set_encryption(owner_password="owner", user_password=password)
    path.write_bytes(bytes(pdf.output()))
    return path


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- readers ------------------------------------------------------------------------------------------------------

def test_text_reader_decodes_utf8_and_falls_back_to_cp1252(tmp_path):
    (tmp_path / "new.txt").write_text("Café crème — naïve résumé", encoding="utf-8")
    (tmp_path / "old.txt").write_bytes("Café “quoted” — 5 €".encode("cp1252"))
    assert [d.text for d in read_document(tmp_path / "new.txt")] == ["Café crème — naïve résumé"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        documents = list(read_document(tmp_path / "old.txt"))
    assert documents[0].text == "Café “quoted” — 5 €"
    assert documents[0].source == str(tmp_path / "old.txt") and documents[0].page is None
    assert any(issubclass(w.category, ReaderWarning) and "cp1252" in str(w.message) for w in caught)


def test_text_reader_rejects_binary_files(tmp_path):
    with_nul = tmp_path / "image.txt"
    with_nul.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    controls = tmp_path / "controls.txt"
    controls.write_bytes(bytes([1, 2, 3, 4, 5, 6, 7, 8, 14, 15]) * 20 + b"some text")
    with pytest.raises(TailorError, match=r"image\.txt: binary data \(contains NUL bytes\)"):
        list(read_document(with_nul))
    with pytest.raises(TailorError, match=r"controls\.txt: binary data .*control characters"):
        list(read_document(controls))


def test_markdown_reader_keeps_text_and_drops_syntax(tmp_path):
    source = tmp_path / "guide.md"
    source.write_text(
        "---\ntitle: Parks Guide\n---\n# Parks **and** pools\n\nSee the [pool page](https://example.org/pool) "
        "for *current* hours.\n\n## Fees\n\n| Pass | Price |\n|------|-------|\n| Adult | $40 |\n| Child | $20 |\n\n"
        "```bash\ncurl https://example.org/api\n```\n\n- first item\n- second item\n", encoding="utf-8")
    [document] = read_document(source)
    text = document.text
    assert document.title == "Parks Guide"
    assert "Parks and pools" in text and "See the pool page for current hours." in text
    assert "Pass: Adult; Price: $40" in text and "Pass: Child; Price: $20" in text
    assert "curl https://example.org/api" in text  # code is content; only the fence goes
    assert "- first item\n- second item" in text
    for syntax in ("https://example.org/pool", "**", "*current*", "# ", "```", "|", "---", "title:"):
        assert syntax not in text, syntax


def test_html_reader_keeps_main_content_only(tmp_path):
    page = tmp_path / "pool.html"
    page.write_text(PAGE_HTML, encoding="utf-8")
    [document] = read_document(page)
    assert document.title == "Pool Hours | City"
    assert "The municipal pool opens on the first of June" in document.text
    assert "Season passes cost forty dollars" in document.text
    assert "families can swim on weekend afternoons.\n\nSeason passes" in document.text  # paragraph break kept
    for junk in BOILERPLATE:
        assert junk not in document.text, junk


def test_html_reader_falls_back_when_trafilatura_finds_nothing(tmp_path, monkeypatch):
    import tailor.data.readers.html as html_reader

    monkeypatch.setattr(html_reader.trafilatura, "bare_extraction", lambda *args, **kwargs: None)
    page = tmp_path / "pool.html"
    page.write_text(PAGE_HTML, encoding="utf-8")
    [document] = read_document(page)
    assert "The municipal pool opens on the first of June" in document.text
    assert "weekend afternoons.\n\nSeason passes" in document.text
    for junk in BOILERPLATE:
        assert junk not in document.text, junk


def test_html_reader_honours_declared_latin1_charset(tmp_path):
    page = tmp_path / "old.html"
    page.write_bytes('<html><head><meta http-equiv="Content-Type" content="text/html; charset=ISO-8859-1">'
                     '</head><body><p>Le café est ouvert à midi.</p></body></html>'.encode("latin-1"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [document] = read_document(page)
    assert "Le café est ouvert à midi." in document.text
    assert not [w for w in caught if issubclass(w.category, ReaderWarning)]  # declared, so no guessing


def test_pdf_reader_gives_one_document_per_page_and_reports_empty_pages(tmp_path):
    path = make_pdf(tmp_path / "guide.pdf", ["First page about permits.", "", "Third page about fees."],
                    title="Permit Guide")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        documents = list(read_document(path))
    assert [(d.page, d.title) for d in documents] == [(1, "Permit Guide"), (3, "Permit Guide")]
    assert "First page about permits." in documents[0].text and "Third page" in documents[1].text
    messages = [str(w.message) for w in caught if issubclass(w.category, ReaderWarning)]
    assert any("no text on page 2" in message for message in messages), messages


def test_pdf_reader_rejects_encrypted_and_truncated_files(tmp_path):
    locked = make_pdf(tmp_path / "locked.pdf", ["secret"], password="user")
    whole = make_pdf(tmp_path / "whole.pdf", ["Some text on a page."]).read_bytes()
    truncated = tmp_path / "truncated.pdf"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(TailorError, match=r"locked\.pdf: encrypted PDF that needs a password"):
        list(read_document(locked))
    with pytest.raises(TailorError, match=r"truncated\.pdf: damaged, truncated or not a PDF"):
        list(read_document(truncated))


def test_registry_rejects_duplicates_and_unknown_extensions(tmp_path):
    with pytest.raises(ValueError, match="already registered"):
        register_reader([".txt"], lambda path: iter(()))
    with pytest.raises(ValueError, match="start with a dot"):
        register_reader(["csv"], lambda path: iter(()))
    with pytest.raises(TailorError, match=r"notes\.rtf: unsupported file type \('\.rtf'; supported: "):
        reader_for(tmp_path / "notes.rtf")
    assert reader_for(tmp_path / "REPORT.PDF") is reader_for(tmp_path / "a.pdf")  # case-insensitive


# --- clean and chunk ----------------------------------------------------------------------------------------------

def test_normalize_text():
    raw = "\ufeffThe  ﬁrst\u00a0line \t \r\nzero\u200bwidth\x00\x07 bell\r\n\r\n\r\n\r\n\tindented  code\f next"
    assert normalize_text(raw) == "The first line\nzerowidth bell\n\n\tindented code\n\nnext"


def test_chunk_text_splits_at_boundaries_with_overlap():
    sentences = [f"Sentence number {i} talks about city services in some detail." for i in range(60)]
    text = "\n\n".join(" ".join(sentences[i:i + 5]) for i in range(0, 60, 5))
    chunks = chunk_text(text, chunk_chars=400, overlap=80)
    assert len(chunks) > 5
    for start, end, chunk in chunks:
        assert text[start:end] == chunk and len(chunk) <= 400
        assert chunk[0].isupper() and chunk.endswith(".")  # starts and ends at a sentence boundary
    for (_, previous_end, _), (next_start, _, _) in pairwise(chunks):
        assert 0 < previous_end - next_start <= 80  # consecutive chunks share some text, at most the overlap
    assert chunks[0][0] == 0 and chunks[-1][1] == len(text)
    covered = set()
    for start, end, _ in chunks:
        covered.update(range(start, end))
    assert all(i in covered for i, char in enumerate(text) if not char.isspace())


def test_chunk_text_edge_cases():
    assert chunk_text("short text", 100, 10) == [(0, 10, "short text")]
    assert chunk_text("   \n ", 100, 10) == []
    hard = chunk_text("x" * 250, 100, 0)
    assert [(start, end) for start, end, _ in hard] == [(0, 100), (100, 200), (200, 250)]
    with pytest.raises(TailorError, match="chunk_overlap must be"):
        chunk_text("text", 100, 100)


# --- ingest -------------------------------------------------------------------------------------------------------

@pytest.fixture
def docs(tmp_path) -> Path:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "library.txt").write_text(GOOD_TEXT, encoding="utf-8")
    (folder / "pool.html").write_text(PAGE_HTML, encoding="utf-8")
    (folder / "sub" / "parks.md").write_text("# Parks\n\nThe rose garden is open from April to October. "
                                             "Dogs on a leash are welcome on all park trails.\n", encoding="utf-8")
    make_pdf(folder / "permits.pdf", ["Building permits are reviewed within ten business days.",
                                      "A fence taller than six feet needs a permit."])
    (folder / "notes.rtf").write_bytes(b"{\\rtf1 not supported}")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "secret.txt").write_text("hidden files are not read at all", encoding="utf-8")
    return folder


def test_ingest_writes_records_from_every_kind(docs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = ingest(["docs"], tmp_path / "out" / "corpus.jsonl", chunk_chars=120, chunk_overlap=30,
                     progress=False)
    records = read_records(tmp_path / "out" / "corpus.jsonl")
    assert isinstance(summary, IngestSummary)
    assert summary.files_read == 4 and summary.documents == 5 and summary.records == len(records)
    assert summary.skipped == [("docs/notes.rtf", "unsupported file type ('.rtf')")]
    assert {r["source"] for r in records} == {"docs/library.txt", "docs/pool.html", "docs/sub/parks.md",
                                              "docs/permits.pdf"}
    assert sorted(r["page"] for r in records if r["source"] == "docs/permits.pdf") == [1, 2]
    assert not any("hidden files" in r["text"] for r in records)
    for record in records:
        assert set(record) == {"id", "text", "source", "page", "line", "chunk", "char_start", "char_end", "sha256",
                               "doc_sha256", "title", "lang"}
        assert record["lang"] == "en"
        assert record["sha256"] == hashlib.sha256(record["text"].encode()).hexdigest()
        assert record["char_end"] - record["char_start"] == len(record["text"]) >= 20
    assert len({r["id"] for r in records}) == len(records)
    library = [r for r in records if r["source"] == "docs/library.txt"]
    assert len(library) > 1 and [r["chunk"] for r in library] == list(range(len(library)))
    normalized = normalize_text(GOOD_TEXT)
    assert all(normalized[r["char_start"]:r["char_end"]] == r["text"] for r in library)
    assert {r["title"] for r in records if r["source"] == "docs/pool.html"} == {"Pool Hours | City"}
    assert json.loads(json.dumps(summary.to_dict()))["skipped"][0]["path"] == "docs/notes.rtf"


def test_ingest_removes_exact_duplicates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text(GOOD_TEXT, encoding="utf-8")
    # differs only in spacing and line endings, which normalization removes
    (tmp_path / "b.txt").write_bytes(GOOD_TEXT.replace(" ", "  ").replace("\n", "\r\n").encode())
    summary = ingest(["a.txt", "b.txt"], tmp_path / "corpus.jsonl", progress=False)
    records = read_records(tmp_path / "corpus.jsonl")
    assert summary.duplicates == [("b.txt", "a.txt")]
    assert {r["source"] for r in records} == {"a.txt"}
    assert summary.files_read == 2 and summary.documents == 1


def test_ingest_skips_broken_files_and_keeps_going(docs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (docs / "binary.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" * 50)
    whole = (docs / "permits.pdf").read_bytes()
    (docs / "broken.pdf").write_bytes(whole[: len(whole) // 3])
    make_pdf(docs / "locked.pdf", ["secret"], password="pw")
    (docs / "empty.txt").write_bytes(b"")
    summary = ingest([docs], tmp_path / "corpus.jsonl", progress=False)
    reasons = dict(summary.skipped)
    assert reasons["docs/binary.txt"].startswith("binary data")
    assert reasons["docs/broken.pdf"].startswith("damaged, truncated or not a PDF")
    assert reasons["docs/locked.pdf"].startswith("encrypted PDF that needs a password")
    assert reasons["docs/empty.txt"] == "empty file"
    sources = {r["source"] for r in read_records(tmp_path / "corpus.jsonl")}
    assert sources == {"docs/library.txt", "docs/pool.html", "docs/sub/parks.md", "docs/permits.pdf"}


def test_ingest_reports_pdf_pages_without_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_pdf(tmp_path / "scan.pdf", ["Only the first page has a text layer in this file.", "", ""])
    summary = ingest(["scan.pdf"], tmp_path / "corpus.jsonl", progress=False)
    assert summary.records == 1
    assert summary.warnings == ["scan.pdf: no text on pages 2, 3 (scanned images? those pages were skipped)"]


def test_ingest_is_deterministic(docs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = ingest(["docs"], tmp_path / "one.jsonl", chunk_chars=150, chunk_overlap=30, progress=True)
    second = ingest(["docs"], tmp_path / "two.jsonl", chunk_chars=150, chunk_overlap=30, progress=False)
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    assert first.records == second.records > 5


def test_ingest_takes_the_config_section_and_names_a_bad_setting(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "contact.txt").write_text("For permits write to Jane Roe at jane.roe@example.org or call "
                                                   "the permit office on weekdays between nine and five.")
    config = validate_config({"ingest": {"pii": "redact", "min_chars": 10}})
    summary = ingest([tmp_path / "docs"], tmp_path / "corpus.jsonl", config.ingest, progress=False)
    (record,) = [json.loads(line) for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    assert "jane.roe@example.org" not in record["text"] and summary.pii_mode == "redact"
    with pytest.raises(TailorError, match=r"^ingest\.chunk_chars: Input should be greater than 100 \(found 5\)$"):
        ingest([tmp_path / "docs"], tmp_path / "other.jsonl", config.ingest, chunk_chars=5, progress=False)
    assert not (tmp_path / "other.jsonl").exists()


def test_ingest_rejects_empty_and_missing_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TailorError, match=r"empty: no documents found \(supported: "):
        ingest([tmp_path / "empty"], tmp_path / "corpus.jsonl", progress=False)
    with pytest.raises(TailorError, match=r"nowhere: file or folder not found"):
        ingest([tmp_path / "nowhere"], tmp_path / "corpus.jsonl", progress=False)
    assert not (tmp_path / "corpus.jsonl").exists()


def test_failed_ingest_leaves_previous_output_untouched(tmp_path):
    output = tmp_path / "corpus.jsonl"
    output.write_text('{"id": "previous"}\n', encoding="utf-8")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "binary.txt").write_bytes(b"\x00\x01\x02" * 100)
    make_pdf(bad / "locked.pdf", ["secret"], password="pw")
    with pytest.raises(TailorError, match=r"no text to write; 2 file\(s\) skipped .*binary\.txt: binary data"):
        ingest([bad], output, progress=False)
    assert output.read_text(encoding="utf-8") == '{"id": "previous"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "corpus.jsonl"]  # no temporary file left


def test_ingest_reads_a_symlinked_file_once_under_its_own_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "page.html").write_text(PAGE_HTML, encoding="utf-8")
    (tmp_path / "site" / "index.html").symlink_to("page.html")
    summary = ingest(["site"], tmp_path / "corpus.jsonl", progress=False)
    assert {r["source"] for r in read_records(tmp_path / "corpus.jsonl")} == {"site/page.html"}
    assert summary.files_read == 1 and summary.duplicates == []


# --- cleaning: boilerplate, quality, language ----------------------------------------------------------------------

def test_boilerplate_quality_and_language_filters(tmp_path, monkeypatch):

    monkeypatch.chdir(tmp_path)
    docs = Path("docs")
    docs.mkdir()
    footer = "Copyright City of Maplewood. All rights reserved."
    topics = ["The pool opens in June and closes on Labor Day for the season.",
              "Building permits are reviewed within ten business days of filing.",
              "Street sweeping happens on the second Tuesday of each month.",
              "The farmers market runs every Saturday morning in the town square."]
    for number, topic in enumerate(topics):
        (docs / f"page{number}.txt").write_text(f"Fees\n\n{topic}\n\n{footer}\n", encoding="utf-8")
    (docs / "symbols.txt").write_text("{}[]<>|#@$%^&*~ " * 10 + "a b c", encoding="utf-8")
    (docs / "spam.txt").write_text("buy cheap tickets now " * 40, encoding="utf-8")
    (docs / "spanish.txt").write_text("La piscina municipal abre en junio y cierra en septiembre para la temporada "
                                      "de verano.", encoding="utf-8")
    summary = ingest(["docs"], "corpus.jsonl", progress=False, near_dup_threshold=None,
                     languages=["en"])
    records = read_records(Path("corpus.jsonl"))
    assert sorted(r["source"] for r in records) == [f"docs/page{n}.txt" for n in range(4)]
    assert all(footer not in r["text"] and r["text"].startswith("Fees\n\n") for r in records)  # headings stay
    assert summary.boilerplate_lines == 4 and summary.languages == {"en": 4}
    reasons = dict(summary.filtered)
    assert reasons["docs/symbols.txt"].endswith("of its characters are symbols (ingest.max_symbol_ratio=0.35)")
    assert "of its word 3-grams are repeats" in reasons["docs/spam.txt"]
    assert reasons["docs/spanish.txt"] == "language es (ingest.languages: en)"
    assert summary.to_dict()["boilerplate_lines_removed"] == 4
    # all off: everything is kept, boilerplate included
    ingest(["docs"], "all.jsonl", progress=False, near_dup_threshold=None,
           boilerplate_min_docs=0, max_symbol_ratio=1.0, max_repeated_ngrams=1.0)
    everything = read_records(Path("all.jsonl"))
    assert len({r["source"] for r in everything}) == 7 and sum(footer in r["text"] for r in everything) == 4
    assert {r["lang"] for r in everything if r["source"] == "docs/spanish.txt"} == {"es"}
