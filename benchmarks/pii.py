"""Precision and recall of `tailor.data.pii` per type, on a generated, labelled set of sentences.

    python benchmarks/pii.py [--sentences 2200] [--seed 0]     → benchmarks/results/pii.json and a table

The set is generated deterministically (seeded `random` and `faker`): sentences around each kind of personal data
in the formats people write it (phones in E.164, international, US, UK, German and French national styles; cards
with spaces, dashes or none; IBANs of eight countries, grouped and compact; IPv4 and compressed IPv6; SSNs with and
without dashes; URLs with tokens in the query; names after cues; street addresses), plus sentences that only hold
look-alikes that are not personal data (order numbers, dates, prices, ISBNs, versions, card-like numbers that fail
Luhn, never-issued SSNs, IBANs with a wrong check, times, organisation names). A finding counts as correct when it
overlaps a gold span of the same type.

Phones are valid numbers (checked with `phonenumbers`), written in varied styles: a detector that checks validity
is not expected to flag invented digits, and neither would a person reading the sentence.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import phonenumbers
from faker import Faker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from tailor.data.pii import STRUCTURED_TYPES, TYPES, detect, luhn_valid  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "pii.json"
Piece = str | tuple[str, str]  # plain text, or (type, value) for a gold span


class Generator:
    """One example per call of each type, cycling, so any prefix of the set covers every type."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.fakers = {}
        for index, locale in enumerate(("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "nl_NL", "it_IT", "pl_PL")):
            self.fakers[locale] = Faker(locale)
            self.fakers[locale].seed_instance(seed * 100 + index)
        self.fake = self.fakers["en_US"]
        self.kinds: list[Callable[[], list[Piece]]] = [
            self.email, self.phone, self.credit_card, self.iban, self.ip, self.ssn, self.url_token, self.person,
            self.address, self.negative, self.negative]

    def examples(self, count: int) -> list[dict]:
        out = []
        for index in range(count):
            pieces = self.kinds[index % len(self.kinds)]()
            text, spans = "", []
            for piece in pieces:
                if isinstance(piece, tuple):
                    spans.append({"type": piece[0], "start": len(text), "end": len(text) + len(piece[1])})
                    piece = piece[1]
                text += piece
            out.append({"text": text, "spans": spans})
        return out

    def choice(self, options):
        return self.rng.choice(options)

    # --- positives ------------------------------------------------------------------------------------------------

    def email(self) -> list[Piece]:
        f = self.fake
        address = self.choice([
            f.email(), f.free_email(), f.company_email(), f.safe_email(),
            f"{f.first_name().lower()}.{f.last_name().lower()}+{f.word()}@{f.domain_word()}.co.uk",
            f"{f.user_name()}{self.rng.randint(1, 999)}@mail.{f.domain_name()}",
            f.email().upper()])
        return self.choice([
            ["Please send the signed form to ", ("EMAIL", address), " before Friday."],
            ["Reply from ", ("EMAIL", address), ": the meter reading was wrong."],
            ["Contact: ", ("EMAIL", address)],
            ["I tried <", ("EMAIL", address), "> twice but got no answer."],
            ["CC ", ("EMAIL", address), " and the permit office on the reply, thanks."]])

    def phone(self) -> list[Piece]:
        number = self.choice([self._valid_phone, self._valid_phone, self._faker_us_phone])()
        return self.choice([
            ["Call me back at ", ("PHONE", number), " after 5pm."],
            ["Resident's mobile: ", ("PHONE", number)],
            ["Her number is ", ("PHONE", number), ", she prefers texts."],
            ["Tel. ", ("PHONE", number), " (office hours only)"],
            ["The caller left ", ("PHONE", number), " as a callback number on 12 March."]])

    def _valid_phone(self) -> str:
        region = self.choice(["US", "US", "GB", "DE", "FR"])
        kind = self.choice([phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE])
        example = phonenumbers.example_number_for_type(region, kind)
        digits = str(example.national_number)
        for _ in range(50):  # vary the subscriber digits until the number is still valid
            keep = max(3, len(digits) - 5)
            candidate = digits[:keep] + "".join(str(self.rng.randint(0, 9)) for _ in digits[keep:])
            number = phonenumbers.parse(f"+{example.country_code}{candidate}")
            if phonenumbers.is_valid_number(number):
                break
        else:
            number = example
        style = self.choice(["E164", "INTERNATIONAL", "NATIONAL", "NATIONAL", "trunk", "dots", "00", "slash"])
        international = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
        national = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
        if style == "trunk" and region != "US":  # +44 (0)20 7946 0958
            code, _, rest = international.partition(" ")
            return f"{code} (0){rest}"
        if style == "dots":  # 415.555.0132, 01.23.45.67.89
            if region == "US":
                digits = str(number.national_number)
                return f"{digits[:3]}.{digits[3:6]}.{digits[6:]}"
            if region == "FR":
                return national.replace(" ", ".")
        if style == "00" and region != "US":  # 0049 30 12345678: the European international prefix
            return "00" + international[1:]
        if style == "slash" and region == "US":  # 4155550132, as exported from a contacts table
            return str(number.national_number)
        if style == "slash" and region == "DE":  # 030/12345678
            area, _, rest = national.partition(" ")
            return f"{area}/{rest.replace(' ', '')}"
        style = style if style in ("E164", "INTERNATIONAL", "NATIONAL") else "NATIONAL"
        return phonenumbers.format_number(number, getattr(phonenumbers.PhoneNumberFormat, style))

    def _faker_us_phone(self) -> str:
        # faker's US styles: (591)341-7776, 206.269.0743x9150, +1-780-563-6083 ...; area codes made valid-looking
        area, exchange = self.rng.randint(201, 989), self.rng.randint(200, 999)
        line = self.rng.randint(0, 9999)
        return self.choice([f"({area}){exchange}-{line:04d}", f"({area}) {exchange}-{line:04d}",
                            f"{area}-{exchange}-{line:04d}", f"+1-{area}-{exchange}-{line:04d}",
                            f"{area}.{exchange}.{line:04d}x{self.rng.randint(10, 9999)}",
                            f"1-{area}-{exchange}-{line:04d}", f"555-01{self.rng.randint(0, 99):02d}"])

    def credit_card(self) -> list[Piece]:
        kind = self.choice(["visa16", "visa16", "mastercard", "mastercard", "amex", "discover", "jcb16", "diners",
                            "visa13", "visa19"])
        digits = self.fake.credit_card_number(kind)
        style = self.choice(["spaces", "dashes", "plain"])
        if style != "plain":
            sizes = (4, 6, 5) if len(digits) == 15 else (4, 6, 4) if len(digits) == 14 else None
            groups, position = [], 0
            for size in sizes or [4] * ((len(digits) + 3) // 4):
                groups.append(digits[position:position + size])
                position += size
            digits = (" " if style == "spaces" else "-").join(g for g in groups if g)
        return self.choice([
            ["Card number ", ("CREDIT_CARD", digits), " was charged twice."],
            ["Paid with ", ("CREDIT_CARD", digits), ", exp 08/27."],
            ["please refund to card ", ("CREDIT_CARD", digits)],
            [("CREDIT_CARD", digits), " is the card on file for the water account."]])

    def iban(self) -> list[Piece]:
        locale = self.choice(["de_DE", "fr_FR", "en_GB", "es_ES", "nl_NL", "it_IT", "pl_PL", "de_DE"])
        iban = self.fakers[locale].iban()
        if self.rng.random() < 0.5:
            iban = " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))
        return self.choice([
            ["Refund to IBAN ", ("IBAN", iban), " please."],
            ["Bank details: ", ("IBAN", iban), ", account holder as above."],
            ["The direct debit from ", ("IBAN", iban), " failed on the 3rd."],
            ["IBAN: ", ("IBAN", iban)]])

    def ip(self) -> list[Piece]:
        f = self.fake
        address = self.choice([
            f.ipv4(), f.ipv4_private(), f.ipv4_public(), f.ipv6(),
            str(ipaddress.IPv6Address(f"2001:db8:{self.rng.randint(0, 0xffff):x}::{self.rng.randint(1, 0xffff):x}")),
            f"fe80::{self.rng.randint(0, 0xffff):x}:{self.rng.randint(0, 0xffff):x}", "::1",
            ipaddress.IPv6Address(self.rng.getrandbits(128)).exploded])
        if self.rng.random() < 0.15:  # with a port: 10.0.0.1:8080, [2001:db8::1]:443
            return ["connect to ", ("IP_ADDRESS", address), f":{self.rng.randint(1, 65535)} failed"] if ":" not in \
                address else ["connect to [", ("IP_ADDRESS", address), f"]:{self.rng.randint(1, 65535)} failed"]
        return self.choice([
            ["Login from ", ("IP_ADDRESS", address), " at 03:12 was blocked."],
            ["client ip=", ("IP_ADDRESS", address), " user_agent=Mozilla/5.0"],
            ["The request came from ", ("IP_ADDRESS", address), "."],
            ["[", ("IP_ADDRESS", address), "] GET /permits 200"]])

    def ssn(self) -> list[Piece]:
        ssn = self.fake.ssn()
        style = self.rng.random()
        if style < 0.6:
            return self.choice([["Applicant SSN ", ("SSN", ssn), " on file."],
                                ["his social security number is ", ("SSN", ssn)],
                                [("SSN", ssn), " was entered on the benefits form."]])
        bare = ssn.replace("-", " " if style < 0.8 else "")
        return self.choice([["SSN: ", ("SSN", bare), " (verify before payout)"],
                            ["Social Security No. ", ("SSN", bare)],
                            ["my SSN is ", ("SSN", bare), ", please update it"]])

    def url_token(self) -> list[Piece]:
        f = self.fake
        key = self.choice(["token", "access_token", "api_key", "apikey", "sig", "X-Amz-Signature", "auth",
                           "refresh_token", "client_secret", "session_id", "key", "password", "id_token"])
        value = self.choice([f.sha1()[:self.rng.randint(16, 40)], f.uuid4(), f.password(length=24, special_chars=False),
                             f"eyJ{f.pystr(min_chars=20, max_chars=40)}.{f.pystr(min_chars=10, max_chars=30)}"])
        base = f"https://{f.domain_name()}/{f.uri_path()}"
        before = self.choice(["?", f"?page={self.rng.randint(1, 9)}&", "?lang=en&", "#", "/callback#state=xyz&"])
        after = self.choice(["", "&format=json", f"&expires={self.rng.randint(10**9, 2 * 10**9)}"])
        return self.choice([
            ["Download it from ", base + before + key + "=", ("URL_TOKEN", value), after, " before it expires."],
            ["Link: ", base + before + key + "=", ("URL_TOKEN", value), after],
            ["The webhook posts to ", base + before + key + "=", ("URL_TOKEN", value), after, "."]])

    def person(self) -> list[Piece]:
        f = self.fakers[self.choice(["en_US", "en_US", "en_GB", "de_DE", "fr_FR", "es_ES"])]
        first, last = f.first_name(), f.last_name()
        name = f"{first} {last}"
        return self.choice([
            ["Dear ", ("PERSON", name), ", thank you for your request."],
            ["Please contact ", ("PERSON", name), " at the front desk."],
            [self.choice(["Mr. ", "Ms. ", "Mrs. ", "Dr. "]), ("PERSON", last), " will inspect the fence on Monday."],
            ["Inspection by ", self.choice(["Dr. ", "Ms. ", "Mr. "]), ("PERSON", name), " is booked."],
            ["I spoke with ", ("PERSON", name), " yesterday about the bill."],
            ["Kind regards,\n", ("PERSON", name)],
            ["Applicant: ", ("PERSON", name), "\nStatus: pending"],
            ["Reported by ", ("PERSON", name), " via the app."],
            # no cue at all: the heuristics are expected to miss most of these, and the table should show it
            [("PERSON", name), " called twice about the water bill."]])

    def address(self) -> list[Piece]:
        f = self.fake
        street = f"{f.building_number()} {f.street_name()}"
        variant = self.rng.random()
        if variant < 0.25:
            street += f", {self.choice(['Apt', 'Suite', 'Unit'])} {f.building_number()}"
        if 0.25 < variant < 0.55:
            street += f", {f.city()}, {f.state_abbr()} {f.zipcode()}"
        return self.choice([
            ["Ship the bin to ", ("ADDRESS", street), " by Friday."],
            ["The pothole is in front of ", ("ADDRESS", street), "."],
            ["Owner lives at ", ("ADDRESS", street)],
            ["Mail the permit to ", ("ADDRESS", street), " please."]])

    # --- negatives: things that look like personal data and are not -----------------------------------------------

    def negative(self) -> list[Piece]:
        f, rng = self.fake, self.rng
        card = f.credit_card_number("visa16")
        bad_card = card[:-1] + str((int(card[-1]) + rng.randint(1, 9)) % 10)
        assert not luhn_valid(bad_card)
        iban = self.fakers[self.choice(["de_DE", "fr_FR", "en_GB"])].iban()
        bad_iban = iban[:2] + f"{(int(iban[2:4]) + rng.randint(1, 90)) % 100:02d}" + iban[4:]
        bad_ssn = self.choice([f"000-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}",
                               f"666-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}",
                               f"9{rng.randint(0, 99):02d}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}",
                               f"{rng.randint(100, 599)}-00-{rng.randint(1000, 9999)}",
                               f"{rng.randint(100, 599)}-{rng.randint(10, 99)}-0000"])
        return [self.choice([
            f"Order #{rng.randint(10**7, 10**9)} shipped on {f.date()}.",
            f"Order number {rng.randint(10**9, 10**11)} was refunded.",
            f"Invoice {f.bothify('INV-####-????').upper()} is due {f.date(pattern='%m/%d/%Y')}.",
            f"The meeting moved to {f.date(pattern='%d.%m.%Y')} at {f.time(pattern='%H:%M')}.",
            f"Total: ${rng.randint(1, 9)},{rng.randint(100, 999)}.{rng.randint(10, 99)} including tax.",
            f"Price {rng.randint(10, 999)},{rng.randint(10, 99)} EUR per year.",
            f"ISBN {f.isbn13()} is the new edition; ISBN-10 {f.isbn10()}.",
            f"Upgrade to version {rng.randint(1, 20)}.{rng.randint(0, 20)}.{rng.randint(0, 99)} today.",
            f"Firmware v{rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 99)} fixes it.",
            f"Reference number {bad_card} could not be matched.",
            f"Test value {' '.join(bad_card[i:i + 4] for i in range(0, 16, 4))} fails the checksum.",
            f"The form shows {bad_ssn}, which is not a valid SSN.",
            f"Bank reference {bad_iban} was rejected.",
            f"The log rotated at {rng.randint(10, 23)}:{rng.randint(10, 59)}:{rng.randint(10, 59)} yesterday.",
            f"Please contact City Hall or the Permit Office about case {rng.randint(1000, 99999)}.",
            f"Dear Resident, the {f.month_name()} newsletter is out.",
            f"Tracking {f.bothify('1Z###??##########').upper()} is in transit.",
            f"Room {rng.randint(100, 499)}, floor {rng.randint(1, 9)}; {rng.randint(2, 40)} seats available.",
            f"We planted {rng.randint(10, 900)} trees in {rng.randint(1990, 2024)} along the river.",
            f"Call the library for opening hours; the code is {f.bothify('??-####').upper()}.",
            f"The population was {rng.randint(10, 999)},{rng.randint(100, 999)} in {rng.randint(1950, 2020)}.",
            f"Serial no. {rng.randint(10**9, 10**10)} belongs to pump {rng.randint(1, 40)}.",
            "Please contact Customer Support or email the Help Desk.",
            f"Dear Valued Customer, your {f.month_name()} statement is ready.",
            f"We moved to New York by {f.day_of_week()} and spoke with Public Works.",
            f"Call 311 or dial 9-1-1; file Form 1040-ES by April {rng.randint(1, 30)}.",
            f"Since {rng.randint(1990, 2024)} Central Park has hosted {rng.randint(2, 90)} concerts.",
            f"Case {rng.randint(10**9, 10**10 - 1)} and account {rng.randint(10**9, 10**10 - 1)} were merged.",
            f"Parcel ID {rng.randint(100, 999)}-{rng.randint(100, 999)}-{rng.randint(1000, 9999)} was reassessed.",
            f"Coordinates {f.latitude()}, {f.longitude()} mark the hydrant.",
        ])]


# --- scoring ------------------------------------------------------------------------------------------------------

def evaluate(examples: list[dict]) -> dict:
    """Per type: gold and predicted counts, precision and recall by same-type span overlap, a few misses."""
    stats = {kind: {"gold": 0, "found": 0, "predicted": 0, "correct": 0, "missed": [], "false": []}
             for kind in TYPES}
    for example in examples:
        text, gold = example["text"], example["spans"]
        predicted = detect(text)
        for span in gold:
            row = stats[span["type"]]
            row["gold"] += 1
            if any(p.type == span["type"] and p.start < span["end"] and span["start"] < p.end for p in predicted):
                row["found"] += 1
            elif len(row["missed"]) < 8:
                row["missed"].append(text[span["start"]:span["end"]] + "  ‹in›  " + text)
        for finding in predicted:
            row = stats[finding.type]
            row["predicted"] += 1
            if any(s["type"] == finding.type and s["start"] < finding.end and finding.start < s["end"] for s in gold):
                row["correct"] += 1
            elif len(row["false"]) < 8:
                row["false"].append(finding.text + "  ‹in›  " + text)
    for row in stats.values():
        row["recall"] = round(row["found"] / row["gold"], 4) if row["gold"] else None
        row["precision"] = round(row["correct"] / row["predicted"], 4) if row["predicted"] else None
    return stats


def table(stats: dict) -> str:
    lines = [f"{'type':<12} {'gold':>5} {'found':>6} {'pred':>5} {'precision':>9} {'recall':>7}"]
    for kind, row in stats.items():
        precision = f"{row['precision']:.3f}" if row["precision"] is not None else "-"
        recall = f"{row['recall']:.3f}" if row["recall"] is not None else "-"
        mark = "*" if kind in STRUCTURED_TYPES else " "
        lines.append(f"{kind:<11}{mark} {row['gold']:>5} {row['found']:>6} {row['predicted']:>5} {precision:>9} "
                     f"{recall:>7}")
    lines.append("* structured types: goal recall >= 0.95")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=2200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    examples = Generator(args.seed).examples(args.sentences)
    started = time.perf_counter()
    stats = evaluate(examples)
    seconds = time.perf_counter() - started
    print(table(stats))
    print(f"{len(examples)} sentences, {sum(len(e['spans']) for e in examples)} gold spans, "
          f"detection {1000 * seconds / len(examples):.2f} ms/sentence")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "sentences": len(examples), "seed": args.seed, "match": "same type, overlapping span",
        "ms_per_sentence": round(1000 * seconds / len(examples), 3),
        "structured_types": list(STRUCTURED_TYPES), "types": stats}, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
