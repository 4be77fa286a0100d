"""Personal data: each detector on real-looking values and look-alikes, the three modes, the keep list, the ingest
wiring, and recall on a slice of the generated benchmark set."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tailor.data.ingest import ingest
from tailor.data.pii import (
    STRUCTURED_TYPES,
    TYPES,
    Finding,
    PiiRedactor,
    detect,
    iban_valid,
    luhn_valid,
    mask,
    ssn_valid,
)
from tailor.errors import TailorError
from tests.unit.helpers import load_benchmark

REPO = Path(__file__).resolve().parents[3]
CITY_DOCS = REPO / "examples" / "city-services" / "docs"

FOUND = [
    ("EMAIL", "Write to maria.lopez+bills@mail.example.co.uk today.", "maria.lopez+bills@mail.example.co.uk"),
    ("EMAIL", "Mail permits@maplewood.gov.", "permits@maplewood.gov"),
    ("PHONE", "Call (555) 201-4400 for permits.", "(555) 201-4400"),
    ("PHONE", "Mobile +1 415-555-0132 after six.", "+1 415-555-0132"),
    ("PHONE", "UK office: +44 20 7946 0958.", "+44 20 7946 0958"),
    ("PHONE", "London number 020 7946 0958 works.", "020 7946 0958"),
    ("PHONE", "Berlin: 030 12345678, ask for billing.", "030 12345678"),
    ("PHONE", "Paris: 01 23 45 67 89.", "01 23 45 67 89"),
    ("PHONE", "E.164 form +14155550132 is stored.", "+14155550132"),
    ("CREDIT_CARD", "Card 4111 1111 1111 1111 was charged.", "4111 1111 1111 1111"),
    ("CREDIT_CARD", "Amex 3782-822463-10005 on file.", "3782-822463-10005"),
    ("CREDIT_CARD", "card 5555555555554444, exp 08/27", "5555555555554444"),
    ("IBAN", "IBAN DE89 3704 0044 0532 0130 00 please.", "DE89 3704 0044 0532 0130 00"),
    ("IBAN", "Pay to GB29NWBK60161331926819.", "GB29NWBK60161331926819"),
    ("IBAN", "FR14 2004 1010 0505 0001 3M02 606 for rent", "FR14 2004 1010 0505 0001 3M02 606"),
    ("IP_ADDRESS", "Login from 203.0.113.42 blocked.", "203.0.113.42"),
    ("IP_ADDRESS", "Host [2001:db8::8a2e:370:7334]:443 down.", "2001:db8::8a2e:370:7334"),
    ("IP_ADDRESS", "Link-local fe80::1ff:fe23:4567:890a seen.", "fe80::1ff:fe23:4567:890a"),
    ("SSN", "SSN 123-45-6789 on the form.", "123-45-6789"),
    ("SSN", "my social security number is 219 09 9999", "219 09 9999"),
    ("URL_TOKEN", "Get https://files.example.org/r.pdf?token=9f8e7d6c5b4a&dl=1 now.", "9f8e7d6c5b4a"),
    ("URL_TOKEN", "https://s3.example.com/x?X-Amz-Signature=abc123def456", "abc123def456"),
    ("URL_TOKEN", "see https://api.example.com/v1/items?api_key=KEY-123).", "KEY-123"),
    ("PERSON", "Dear Maria Lopez, thank you.", "Maria Lopez"),
    ("PERSON", "Ms. O'Brien will call back.", "O'Brien"),
    ("PERSON", "Please contact Jean-Luc Picard at the desk.", "Jean-Luc Picard"),
    ("ADDRESS", "Mail it to 42 Oak Street, Apt 4B, Springfield, IL 62704 soon.",
     "42 Oak Street, Apt 4B, Springfield, IL 62704"),
    ("ADDRESS", "The office is at 400 Linden Avenue.", "400 Linden Avenue"),
]

NOT_FOUND = [
    "Order #4821397755 shipped on 2024-03-15.",
    "Reference 4111 1111 1111 1112 fails Luhn.",  # one digit off a valid card
    "Number 1234 5678 9012 3456 is no card.",
    "The form shows 000-12-3456, 666-12-3456, 912-12-3456, 123-00-4567 and 123-45-0000.",
    "Bank reference DE88 3704 0044 0532 0130 00 was rejected.",  # check digits off by one
    "ISBN 978-3-16-148410-0 and ISBN 0-306-40615-2 are in stock.",
    "Upgrade to version 2.14.3 or firmware v1.2.3.4.",
    "The meeting moved to 03.02.2024 at 10:30:00.",
    "Total $1,299.99; population 42,317 in 2019; coordinates 72.0891705, -147.132155.",
    "Please contact City Hall or the Permit Office.",
    "Dear Resident, we moved to New York by Monday.",
    "Boston, MA 02110-1301 is a ZIP+4 code.",
    "See https://example.org/orders/5551234567?page=2&sort=asc for the list.",
    "Since 2007 Central Park has hosted concerts.",
]


@pytest.mark.parametrize("kind,text,value", FOUND, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(FOUND)])
def test_detects_each_type(kind, text, value):
    findings = detect(text)
    assert [(f.type, f.text) for f in findings] == [(kind, value)]
    assert text[findings[0].start:findings[0].end] == value


@pytest.mark.parametrize("text", NOT_FOUND)
def test_look_alikes_are_not_personal_data(text):
    assert detect(text) == []


def test_checksums():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("DE89370400440532013000") and not iban_valid("DE88370400440532013000")
    assert not iban_valid("DE8937040044053201300")  # one character short for Germany
    assert ssn_valid("123", "45", "6789")
    for area, group, serial in [("000", "12", "3456"), ("666", "12", "3456"), ("900", "12", "3456"),
                                ("123", "00", "4567"), ("123", "45", "0000")]:
        assert not ssn_valid(area, group, serial)


SAMPLE = ("Dear Maria Lopez, call (212) 555-0198 or write to maria@gmail.com. Card 4111-1111-1111-1111, "
          "IBAN DE89 3704 0044 0532 0130 00, SSN 123-45-6789, from 10.1.2.3 via "
          "https://x.example.com/cb?access_token=s3cr3tT0ken. She lives at 42 Oak Street.")


def test_redact_replaces_every_type_with_its_placeholder():
    redactor = PiiRedactor("redact")
    text, findings = redactor.apply(SAMPLE)
    assert text == ("Dear <PERSON>, call <PHONE> or write to <EMAIL>. Card <CREDIT_CARD>, IBAN <IBAN>, SSN <SSN>, "
                    "from <IP_ADDRESS> via https://x.example.com/cb?access_token=<URL_TOKEN>. She lives at "
                    "<ADDRESS>.")
    assert all(isinstance(f, Finding) and SAMPLE[f.start:f.end] == f.text for f in findings)
    assert redactor.report()["counts"] == dict.fromkeys(("ADDRESS", "CREDIT_CARD", "EMAIL", "IBAN", "IP_ADDRESS",
                                                         "PERSON", "PHONE", "SSN", "URL_TOKEN"), 1)
    redactor.apply("Another: bob@example.net")
    assert redactor.counts["EMAIL"] == 2  # the report accumulates over a corpus


def test_types_limit_what_is_replaced():
    text, findings = PiiRedactor("redact", types=["EMAIL"]).apply(SAMPLE)
    assert [f.type for f in findings] == ["EMAIL"] and "(212) 555-0198" in text
    with pytest.raises(TailorError, match="unknown PASSPORT"):
        PiiRedactor("redact", types=["PASSPORT"])
    with pytest.raises(TailorError, match="pii mode must be one of redact, mask, pseudonymize"):
        PiiRedactor("scramble")


def test_mask_keeps_the_shape_and_the_last_four_digits():
    text, _ = PiiRedactor("mask").apply(SAMPLE)
    assert "Dear M**** L****," in text
    assert "call (***) ***-0198" in text
    assert "write to m****@*****.com" in text
    assert "Card ****-****-****-1111" in text
    assert "IBAN DE** **** **** **** **30 00" in text
    assert "SSN ***-**-6789" in text
    assert "access_token=***********." in text  # s3cr3tT0ken, 11 characters
    assert mask(Finding("IP_ADDRESS", 0, 8, "10.1.2.3")) == "**.*.*.*"


def test_pseudonyms_are_consistent_valid_looking_and_from_reserved_ranges():
    one, two = PiiRedactor("pseudonymize", secret="k1"), PiiRedactor("pseudonymize", secret="k1")
    first, _ = one.apply(SAMPLE)
    assert two.apply(SAMPLE)[0] == first  # same key, same fakes: consistent across a corpus
    assert PiiRedactor("pseudonymize", secret="k2").apply(SAMPLE)[0] != first  # the key matters
    fakes = {f.type: f.text for f in detect(first)}
    # every fake is itself detected as its type, so fakes look like the real thing; except the SSN, whose fake
    # comes from the never-issued 9xx area on purpose
    assert set(fakes) == set(TYPES) - {"SSN"}
    assert fakes["EMAIL"].endswith("@example.com")
    assert re.fullmatch(r"\(\d{3}\) 555-01\d\d", fakes["PHONE"])
    card = fakes["CREDIT_CARD"]
    assert re.fullmatch(r"\d{4}-\d{4}-\d{4}-\d{4}", card) and luhn_valid(card.replace("-", ""))
    assert fakes["IBAN"].startswith("DE") and iban_valid(fakes["IBAN"].replace(" ", ""))
    assert fakes["IP_ADDRESS"].startswith("192.0.2.")
    assert re.search(r"SSN 9\d\d-\d\d-\d{4}, from 192\.0\.2\.", first)
    assert "s3cr3tT0ken" not in first and "maria@gmail.com" not in first and "Maria Lopez" not in first
    # the same value in another sentence gets the same fake
    again, _ = one.apply("Also maria@gmail.com, twice.")
    assert fakes["EMAIL"] in again
    ipv6, _ = one.apply("from 2001:470::1")
    assert ipv6.startswith("from 2001:db8::")


def test_keep_list_leaves_public_contact_data_alone():
    redactor = PiiRedactor("redact", keep=[r"@maplewood\.gov$", r"^\(555\) 201-\d{4}$"])
    text, findings = redactor.apply("Permits: (555) 201-4400 or permits@maplewood.gov. "
                                    "Resident: (555) 867-5309, jane.doe@gmail.com.")
    assert text == "Permits: (555) 201-4400 or permits@maplewood.gov. Resident: <PHONE>, <EMAIL>."
    assert [f.type for f in findings] == ["PHONE", "EMAIL"]
    assert redactor.report()["kept"] == {"EMAIL": 1, "PHONE": 1}
    with pytest.raises(TailorError, match=r"pii_keep: '\(555' is not a valid regular expression"):
        PiiRedactor("redact", keep=["(555"])


def test_city_documents_public_contacts_are_found():
    """The example's department lines and addresses are personal-data shaped; without a keep list they go."""
    text = (CITY_DOCS / "city-hall.md").read_text(encoding="utf-8")
    kinds = {f.type for f in detect(text)}
    assert {"PHONE", "EMAIL"} <= kinds
    kept = PiiRedactor("redact", keep=[r"@maplewood\.gov$", r"^\(555\)\s201-\d{4}$"])
    redacted, _ = kept.apply(text)
    assert "<PHONE>" not in redacted and "<EMAIL>" not in redacted


def test_ingest_applies_pii_before_dedup_and_reports_counts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    shutil.copy(CITY_DOCS / "city-hall.md", tmp_path / "docs" / "city-hall.md")
    letter = ("Dear Maria Lopez, your permit is approved. We will call you at (212) 555-0198 or write to "
              "maria.lopez@gmail.com if the inspector needs access. Card 4111 1111 1111 1111 was charged $40.")
    (tmp_path / "docs" / "letter-1.txt").write_text(letter, encoding="utf-8")
    # the same letter to another resident: identical once the personal data is redacted
    (tmp_path / "docs" / "letter-2.txt").write_text(
        letter.replace("Maria Lopez", "Tom Baker").replace("maria.lopez", "tbaker").replace("0198", "0175"),
        encoding="utf-8")
    summary = ingest(["docs"], tmp_path / "corpus.jsonl", pii="redact", pii_keep=[r"@maplewood\.gov$"],
                     progress=False)
    corpus = (tmp_path / "corpus.jsonl").read_text(encoding="utf-8")
    assert "maria.lopez@gmail.com" not in corpus and "4111 1111" not in corpus and "Maria Lopez" not in corpus
    assert "Dear <PERSON>, your permit" in corpus and "<CREDIT_CARD>" in corpus
    assert "info@maplewood.gov" in corpus  # kept
    assert summary.duplicates == [("docs/letter-2.txt", "docs/letter-1.txt")]
    assert summary.pii_counts["EMAIL"] == 2 and summary.pii_counts["CREDIT_CARD"] == 2
    assert summary.pii_kept["EMAIL"] >= 1
    assert summary.to_dict()["pii"]["mode"] == "redact"


def test_cli_ingest_pii_option(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tailor.cli.app import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "note.txt").write_text("Resident complaint from jane.doe@gmail.com about the noise on Elm.",
                                       encoding="utf-8")
    result = CliRunner().invoke(app, ["ingest", "note.txt", "-o", "corpus.jsonl", "--pii", "mask", "--no-progress"])
    assert result.exit_code == 0, result.output
    [record] = [json.loads(line) for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    assert "j*******@*****.com" in record["text"]
    assert json.loads((tmp_path / "corpus.report.json").read_text())["pii"]["counts"] == {"EMAIL": 1}
    assert "personal data (mask): EMAIL 1" in result.output


def _benchmark():
    return load_benchmark("pii")


def test_benchmark_slice_recall_per_structured_type():
    pytest.importorskip("faker")
    benchmark = _benchmark()
    examples = benchmark.Generator(seed=7).examples(440)  # 40 of each type, a different seed from the report
    stats = benchmark.evaluate(examples)
    for kind in STRUCTURED_TYPES:
        assert stats[kind]["gold"] >= 40
        assert stats[kind]["recall"] >= 0.95, (kind, stats[kind]["missed"])
        assert stats[kind]["precision"] >= 0.9, (kind, stats[kind]["false"])
    assert Path(benchmark.RESULTS).name == "pii.json"
