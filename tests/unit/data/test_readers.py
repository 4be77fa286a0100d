"""Readers beyond plain documents: Word files, CSV/JSON records and chat transcripts, with their provenance."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import docx
import pytest
from fpdf import FPDF

from tailor.data.chatlog import turns_to_messages
from tailor.data.ingest import ingest
from tailor.data.readers import ReaderOptions, ReaderWarning, read_document
from tailor.errors import TailorError


def read_all(path: Path, options: ReaderOptions | None = None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReaderWarning)
        documents = list(read_document(path, options))
    return documents, [str(w.message) for w in caught if issubclass(w.category, ReaderWarning)]


def test_docx_keeps_reading_order_headings_lists_and_tables(tmp_path):
    document = docx.Document()
    document.core_properties.title = "Waste collection"
    document.add_heading("Trash pickup", level=1)
    document.add_paragraph("Bins go out by 7 am on your collection day.")
    table = document.add_table(rows=3, cols=2)
    for row, values in zip(table.rows, [("Zone", "Day"), ("North", "Monday"), ("South", "Thursday")], strict=True):
        for cell, value in zip(row.cells, values, strict=True):
            cell.text = value
    document.add_paragraph("Glass", style="List Bullet")
    document.add_paragraph("Paper", style="List Bullet")
    document.add_paragraph("Call 311 for bulky items.")
    path = tmp_path / "waste.docx"
    document.save(path)

    (read,), problems = read_all(path)
    assert problems == [] and read.title == "Waste collection" and read.source == str(path)
    assert read.text == ("Trash pickup\n\nBins go out by 7 am on your collection day.\n\n"
                         "Zone: North; Day: Monday\nZone: South; Day: Thursday\n\n- Glass\n- Paper\n\n"
                         "Call 311 for bulky items.")


def test_docx_that_is_not_one_is_named(tmp_path):
    path = tmp_path / "old.docx"
    path.write_bytes(b"\xd0\xcf\x11\xe0 an old binary .doc renamed")
    with pytest.raises(TailorError, match=r"old\.docx: damaged or not a Word \.docx file .*saved as \.docx"):
        list(read_document(path))


def test_csv_and_tsv_rows_become_documents_with_their_line(tmp_path):
    path = tmp_path / "faq.csv"
    path.write_text('title,text\nPool,"The pool opens in June.\nIt closes on Labor Day."\nLibrary,Open at nine.\n'
                    ',\n', encoding="utf-8")
    documents, problems = read_all(path)
    assert [(d.title, d.text, d.line) for d in documents] == [
        ("Pool", "The pool opens in June.\nIt closes on Labor Day.", 3), ("Library", "Open at nine.", 4)]
    assert problems == [f"{path}:5: no text field (set ingest.text_field to the field that holds the text); "
                        f"record skipped"]
    tsv = tmp_path / "notes.tsv"
    tsv.write_text("office\thours\nClerk\t9 to 5\n", encoding="utf-8")
    (document,), _ = read_all(tsv)
    assert document.text == "office: Clerk\nhours: 9 to 5" and document.line == 2  # no text column: all fields


def test_json_lines_and_arrays_with_a_configured_text_field(tmp_path):
    path = tmp_path / "pages.jsonl"
    lines = [{"fields": {"body": "Parking permits cost 40 dollars."}, "title": "Parking"}, "not json",
             {"fields": {}}, {"fields": {"body": "Dogs must be leashed in parks."}}]
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n",
                    encoding="utf-8")
    documents, problems = read_all(path, ReaderOptions(text_field="fields.body"))
    assert [(d.text, d.line, d.title) for d in documents] == [("Parking permits cost 40 dollars.", 1, "Parking"),
                                                               ("Dogs must be leashed in parks.", 4, None)]
    assert problems[0].startswith(f"{path}:2: invalid JSON (Expecting value at column 1)")
    assert problems[1] == (f'{path}:3: no text in field "fields.body" (set ingest.text_field to the field that '
                           f'holds the text); record skipped')
    array = tmp_path / "export.json"
    array.write_text(json.dumps({"data": [{"content": "First record."}, {"content": "Second record."}]}))
    documents, _ = read_all(array)
    assert [(d.text, d.line) for d in documents] == [("First record.", 1), ("Second record.", 2)]
    broken = tmp_path / "broken.json"
    broken.write_text('{"content": "x",\n  oops}', encoding="utf-8")
    with pytest.raises(TailorError, match=r"broken\.json:2: invalid JSON"):
        list(read_document(broken))


def test_chat_roles_by_mapping_words_and_order_with_consecutive_turns_merged():
    turns = [("Dana", "Hi"), ("Dana", "my bin was not emptied"), ("Agent Lee", "Sorry! Which street?"),
             ("Dana", "Elm St")]
    assert turns_to_messages(turns, {}, "log:1") == [
        {"role": "user", "content": "Hi\nmy bin was not emptied"},
        {"role": "assistant", "content": "Sorry! Which street?"}, {"role": "user", "content": "Elm St"}]
    # neither name says which side: the first to speak is the user, unless the mapping says otherwise
    plain = [("Kim", "Is the pool open?"), ("Sam", "Yes, until 8 pm.")]
    assert [m["role"] for m in turns_to_messages(plain, {}, "log:1")] == ["user", "assistant"]
    assert [m["role"] for m in turns_to_messages(plain, {"KIM": "assistant"}, "log:1")] == ["assistant", "user"]
    with pytest.raises(TailorError, match=r"log:7: cannot tell whether speaker 'Pat' .* ingest\.speaker_roles"):
        turns_to_messages(plain + [("Pat", "me too")], {}, "log:7")


def test_chat_transcripts_per_turn_csv_and_whole_conversation_jsonl(tmp_path):
    log = tmp_path / "support.csv"
    log.write_text("conversation_id,speaker,text\nc1,customer,My street light is out.\nc1,customer,Oak Ave.\n"
                   "c1,agent,Thanks! A crew will fix it within 3 days.\nc2,caller,When is bulky pickup?\n"
                   "c2,operator,First Monday of the month.\n", encoding="utf-8")
    documents, problems = read_all(log)
    assert problems == [] and [(d.title, d.line) for d in documents] == [("c1", 2), ("c2", 5)]
    assert documents[0].messages == ({"role": "user", "content": "My street light is out.\nOak Ave."},
                                     {"role": "assistant", "content": "Thanks! A crew will fix it within 3 days."})
    assert documents[0].text == ("User: My street light is out.\nOak Ave.\n\n"
                                 "Assistant: Thanks! A crew will fix it within 3 days.")
    sharegpt = tmp_path / "chats.jsonl"
    sharegpt.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hello"},
                                                      {"from": "gpt", "value": "Hi, how can I help?"}]}) + "\n",
                        encoding="utf-8")
    (document,), _ = read_all(sharegpt)
    assert [m["role"] for m in document.messages] == ["user", "assistant"] and document.line == 1


def test_ingest_keeps_conversations_whole_and_records_provenance(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("log.jsonl").write_text("\n".join(json.dumps(turn) for turn in [
        {"conversation_id": 7, "speaker": "Resident", "text": "Where do I renew a parking permit? " * 3},
        {"conversation_id": 7, "speaker": "Clerk", "text": "Online at the city portal, or at City Hall. " * 3},
    ]) + "\n", encoding="utf-8")
    summary = ingest(["log.jsonl"], "corpus.jsonl", chunk_chars=150, chunk_overlap=20, progress=False,
                     speaker_roles={"clerk": "assistant"})
    (record,) = [json.loads(line) for line in Path("corpus.jsonl").read_text().splitlines()]
    assert summary.records == 1 and record["line"] == 1 and record["source"] == "log.jsonl"
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    assert len(record["text"]) > 150  # not chunked
    with pytest.raises(TailorError, match=r"ingest\.speaker_roles\.clerk: Input should be 'system', 'user' or "
                                          r"'assistant' \(found 'agent'\)"):
        ingest(["log.jsonl"], "corpus.jsonl", progress=False, speaker_roles={"clerk": "agent"})


def test_pdf_pages_without_text_are_reported_not_silently_lost(tmp_path):
    pdf = FPDF()
    pdf.set_font("Helvetica", size=12)
    pdf.add_page()
    pdf.multi_cell(0, 8, "Page one has a text layer about snow removal routes.")
    pdf.add_page()
    pdf.rect(20, 20, 100, 100, style="F")  # a scanned page: an image, no text layer
    path = tmp_path / "scan.pdf"
    path.write_bytes(bytes(pdf.output()))
    documents, problems = read_all(path)
    assert [d.page for d in documents] == [1]
    assert problems == [f"{path}: no text on page 2 (scanned images? those pages were skipped)"]
