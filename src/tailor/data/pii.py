"""Personal data in text: find it, then redact, mask or pseudonymize it.

    redactor = PiiRedactor("redact", keep=[r"@maplewood\\.gov$"])
    text, findings = redactor.apply("Write to ann.lee@gmail.com or permits@maplewood.gov")
    # -> "Write to <EMAIL> or permits@maplewood.gov", [Finding("EMAIL", 9, 26, "ann.lee@gmail.com")]

Structured types are found by pattern *and* checksum or validity rule, which is what keeps precision high: cards
must pass Luhn and start with a card-network prefix, IBANs must pass mod-97 and have their country's length, SSNs
must avoid the never-issued areas, IPs must parse, phones must be valid numbers for their region (via
`phonenumbers`) or have the North American shape. Person names and street addresses have no checksum; they are
found by cues (an honorific, "Dear", "contact", a street suffix) and will miss names that appear without one.

Modes:
- `redact`: the type as a placeholder, `<EMAIL>`, `<PHONE>`, ...
- `mask`: the same shape with characters replaced by `*`, keeping what a reader needs to tell values apart (the
  last 4 digits of numbers, an email's first letter and top-level domain, a name's initials).
- `pseudonymize`: a fake of the same type, chosen by a keyed hash of the value, so the same person or number maps
  to the same fake everywhere in a corpus (the model still learns "the same customer called twice"). Fakes come
  from reserved or never-issued ranges: 555-01xx phones, example.com emails, 192.0.2.x and 2001:db8:: addresses,
  area 9xx SSNs; cards and IBANs are checksum-valid. Without a secret the key is fixed and public, so anyone could
  hash every SSN and reverse the mapping: pass `secret=` (or set TAILOR_PII_SECRET) for data that leaves you.

`keep` is an allow-list of regular expressions searched in each finding's text: public contact data such as a
city's `@maplewood.gov` addresses or its `(555) 201-xxxx` department lines stays as written.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import phonenumbers

from tailor.errors import TailorError

TYPES = ("EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "IP_ADDRESS", "SSN", "URL_TOKEN", "PERSON", "ADDRESS")
STRUCTURED_TYPES = TYPES[:7]  # the ones with a format or checksum to check against
MODES = ("redact", "mask", "pseudonymize")
DEFAULT_SECRET = "tailor-pii-default-key"


@dataclass(frozen=True)
class Finding:
    type: str
    start: int  # offsets in the text given to `apply`
    end: int
    text: str


# --- URLs carrying secrets --------------------------------------------------------------------------------------

URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"'`]+", re.IGNORECASE)
URL_PARAM = re.compile(r"[?&#;]([A-Za-z0-9_.\-\[\]]+)=([^&#;\s()\[\]<>\"']*)")  # a value ends where markdown resumes
SECRET_PARAMS = {"key", "sig", "code", "auth", "pwd", "pass", "passwd", "sid", "session", "jwt", "otp", "hmac",
                 "apikey", "xamzcredential", "awsaccesskeyid", "signature", "st", "se", "sp"}
SECRET_PARAM_PARTS = ("token", "secret", "signature", "password", "apikey", "credential", "sessionid", "accesskey",
                      "authkey", "privatekey")


def _secret_param(name: str) -> bool:
    plain = re.sub(r"[^a-z]", "", name.lower())
    return plain in SECRET_PARAMS or any(part in plain for part in SECRET_PARAM_PARTS)


def _urls(text: str) -> Iterator[tuple[int, int]]:
    for match in URL.finditer(text):
        end = match.end()
        while end > match.start() and text[end - 1] in ".,;:!?)]}'\"":  # sentence punctuation, not URL
            end -= 1
        yield match.start(), end


def find_url_tokens(text: str) -> Iterator[Finding]:
    """Only the value is a finding: the rest of the URL is useful and harmless (`?token=<URL_TOKEN>`)."""
    for start, end in _urls(text):
        for param in URL_PARAM.finditer(text, start, end):
            if param.group(2) and _secret_param(param.group(1)):
                yield Finding("URL_TOKEN", param.start(2), param.end(2), param.group(2))


# --- emails -------------------------------------------------------------------------------------------------------

EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
                   r"[A-Za-z]{2,24}\b")


def find_emails(text: str) -> Iterator[Finding]:
    for match in EMAIL.finditer(text):
        yield Finding("EMAIL", match.start(), match.end(), match.group())


# --- numbers with a checksum: cards, IBANs ------------------------------------------------------------------------

def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char) * (2 if index % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def _card_network(digits: str) -> bool:
    """Issuer prefixes and lengths: a Luhn-valid order number that starts with 1, 7, 8 or 9 is not a card."""
    n, two, four = len(digits), int(digits[:2]), int(digits[:4])
    return ((digits[0] == "4" and n in (13, 16, 19))  # Visa
            or (51 <= two <= 55 and n == 16) or (2221 <= four <= 2720 and n == 16)  # Mastercard
            or (two in (34, 37) and n == 15)  # American Express
            or ((digits.startswith(("6011", "65")) or 644 <= int(digits[:3]) <= 649
                 or two == 62) and 16 <= n <= 19)  # Discover, UnionPay
            or ((300 <= int(digits[:3]) <= 305 or two in (36, 38, 39)) and 14 <= n <= 19)  # Diners Club
            # JCB issues from 3528-3589; the whole 35 block is taken because a miss leaks a card, while a false
            # hit only hides a Luhn-valid 16-digit number
            or (two == 35 and 16 <= n <= 19)  # JCB
            or ((two == 50 or 56 <= two <= 69) and 12 <= n <= 19))  # Maestro


# digit groups joined by single spaces or dashes; one way to read each string, so no backtracking blow-up
CARD = re.compile(r"(?<![\w-])\d+(?:[ -]\d+){0,7}(?![\w-])")
CARD_GROUPINGS = ((4, 4, 4, 4), (4, 6, 5), (4, 6, 4), (4, 4, 4, 4, 3), (4, 4, 4, 1), (4, 4, 4, 2), (4, 4, 4, 3),
                  (4, 4, 5), (4, 4, 4))


def _card_ok(raw: str) -> bool:
    groups = re.split(r"[ -]", raw)
    if len(groups) > 1 and (len(set(re.findall(r"[ -]", raw))) > 1
                            or tuple(len(g) for g in groups) not in CARD_GROUPINGS):
        return False  # "2024 1234 5678" is a date and a reference, not a card split by its printer
    digits = "".join(groups)
    return 13 <= len(digits) <= 19 and luhn_valid(digits) and _card_network(digits)


def find_credit_cards(text: str) -> Iterator[Finding]:
    for match in CARD.finditer(text):
        if sum(char.isdigit() for char in match.group()) < 13:
            continue
        yield from _best_grouped_span("CREDIT_CARD", text, match, _card_ok)


IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "BY": 28,
    "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19,
    "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}
IBAN = re.compile(r"(?<![\w-])[A-Z]{2}\d{2}[A-Z0-9]*(?:[ -][A-Z0-9]+){0,9}(?![\w-])")


def iban_valid(compact: str) -> bool:
    if IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def find_ibans(text: str) -> Iterator[Finding]:
    for match in IBAN.finditer(text):
        yield from _best_grouped_span("IBAN", text, match, lambda raw: iban_valid(re.sub(r"[ -]", "", raw)))


def _best_grouped_span(kind: str, text: str, match: re.Match, valid) -> Iterator[Finding]:
    """The longest run of whole groups inside `match` that passes `valid`.

    The pattern is greedy, so "IBAN DE89 3704 0044 0532 0130 00 AB12" or "ref 12 4111 1111 1111 1111" reach past
    the number; trying sub-runs of groups recovers the number itself.
    """
    pieces = [(m.start(), m.end()) for m in re.finditer(r"[A-Za-z0-9]+", match.group())]
    for size in range(len(pieces), 0, -1):
        for first in range(len(pieces) - size + 1):
            start, end = match.start() + pieces[first][0], match.start() + pieces[first + size - 1][1]
            if valid(text[start:end]):
                yield Finding(kind, start, end, text[start:end])
                return


# --- US social security numbers -----------------------------------------------------------------------------------

SSN = re.compile(r"(?<![\w-])(\d{3})([- ]?)(\d{2})\2(\d{4})(?![\w-])")
SSN_CUE = re.compile(r"\b(?:ssn|ss#|ssn#|social security(?: number| no\.?| #)?|soc\.? sec\.?)\W{0,3}(?:is\W{0,2})?$",
                     re.IGNORECASE)


def ssn_valid(area: str, group: str, serial: str) -> bool:
    """Never issued: area 000, 666 and 900-999 (ITINs live there), group 00, serial 0000."""
    return area not in ("000", "666") and area < "900" and group != "00" and serial != "0000"


def find_ssns(text: str) -> Iterator[Finding]:
    for match in SSN.finditer(text):
        area, separator, group, serial = match.groups()
        if not ssn_valid(area, group, serial):
            continue
        # nine bare digits are as often an account or order number: only take them after an "SSN" cue
        if separator != "-" and not SSN_CUE.search(text[max(0, match.start() - 30):match.start()]):
            continue
        yield Finding("SSN", match.start(), match.end(), match.group())


# --- IP addresses -------------------------------------------------------------------------------------------------

OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.]){OCTET}(?:\.{OCTET}){{3}}(?!\w|\.\d)")
IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f:]*:[0-9A-Fa-f]*:[0-9A-Fa-f:]*(?:\d{1,3}(?:\.\d{1,3}){3})?(?![\w:]|\.\d)")
VERSION_CUE = re.compile(r"(?:\bv|version|release|build|firmware|driver)\s*$", re.IGNORECASE)


def find_ips(text: str) -> Iterator[Finding]:
    for match in IPV4.finditer(text):
        if VERSION_CUE.search(text[max(0, match.start() - 12):match.start()]):
            continue  # "version 10.2.0.1" is a version, not an address
        yield Finding("IP_ADDRESS", match.start(), match.end(), match.group())
    for match in IPV6.finditer(text):
        raw = match.group()
        end = match.end()
        if raw.endswith(":") and not raw.endswith("::"):  # "at 2001:db8::1: the..." ends at the address
            raw, end = raw[:-1], end - 1
        if not re.search(r"[0-9A-Fa-f]", raw):
            continue
        try:
            ipaddress.IPv6Address(raw)
        except ValueError:  # times (10:30:00), MAC addresses, C++ scopes
            continue
        yield Finding("IP_ADDRESS", match.start(), end, raw)


# --- phone numbers ------------------------------------------------------------------------------------------------

# North American shape, valid or not: public lines like (555) 201-4400 use the fictional 555 exchange, which
# `phonenumbers` rightly calls invalid, yet a reader sees a phone number.
NANP = re.compile(r"(?<![\w+-])(?:\+?1[ .-]?)?(?:\(\d{3}\)\s?\d{3}[ .-]|\d{3}([ .-])\d{3}\1)\d{4}"
                  r"(?:\s?(?:x|ext\.?|extension)\s?\d{1,5})?(?![\w-])", re.IGNORECASE)
LOCAL_555 = re.compile(r"(?<![\w-])555[ .-]01\d\d(?![\w-])")  # the fictional range our pseudonyms use
PHONE_REGIONS = ("US", "GB", "DE", "FR")  # national formats recognised without a +country code
# dates (15.03.2024, 04 12 2023) and US ZIP+4 codes (02110-1301), which dense numbering plans call valid numbers
DATE_LIKE = re.compile(r"^\d{1,4}[./-]\d{1,2}[./-]\d{1,4}$|^\d{1,2}\s\d{1,2}\s(?:19|20)\d\d$|^\d{5}-\d{4}$")
# a number right after these words is an identifier, whatever its shape
NUMBER_CUE = re.compile(r"\b(?:isbn(?:-1[03])?|issn|order|invoice|ref|reference|tracking|serial|part|sku|item|case|"
                        r"ticket|account|acct|confirmation|receipt|policy|permit|claim|id)"
                        r"(?:\s+(?:number|no\.?|#))?\W{0,3}$", re.IGNORECASE)
# a bare digit run is a phone number only with one of these words shortly before it
PHONE_CUE = re.compile(r"\b(?:phone|tel|telephone|mobile|cell|fax|call|caller|callback|dial|sms|text|whatsapp|"
                       r"contact|reach)\b", re.IGNORECASE)


def find_phones(text: str) -> Iterator[Finding]:
    for region in PHONE_REGIONS:
        for number in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
            raw, start = number.raw_string, number.start
            if raw.startswith("(") and ")" not in raw:  # "(800-292-9263": the bracket opens a remark
                raw, start = raw[1:], start + 1
            if raw.startswith("+") or _plausible_national(text, raw, start, number.end, region):
                yield Finding("PHONE", start, number.end, raw)
    for pattern in (NANP, LOCAL_555):
        for match in pattern.finditer(text):
            if not match.group().startswith("+") and _after_number_cue(text, match.start()):
                continue
            yield Finding("PHONE", match.start(), match.end(), match.group())


def _plausible_national(text: str, raw: str, start: int, end: int, region: str) -> bool:
    """A number without +country code: `phonenumbers` calls many digit runs valid, so its shape must fit too."""
    if region == "US":
        shaped = NANP.fullmatch(raw) or raw.isdigit()  # bare digits need a cue, below
    else:
        # the European plans are so dense that only numbers written with the 0 trunk prefix are taken
        shaped = raw.lstrip("(").startswith("0")
    groups = raw.split(".")
    if (not shaped or DATE_LIKE.match(raw) or _after_number_cue(text, start)
            or (len(groups) > 1 and not all(2 <= len(g) <= 4 for g in groups[1:]))):  # 0.9978, 0.3.33.112
        return False
    if re.search(r"\d[.,]?$", text[max(0, start - 2):start]) or re.match(r"[.,]\d", text[end:end + 2]):
        return False  # the middle of a longer number, such as the decimals of a coordinate
    if raw.isdigit():  # a bare digit run is as often a size or an id: it needs "phone", "call", "tel" before it
        return bool(PHONE_CUE.search(text[max(0, start - 30):start]))
    return True


def _after_number_cue(text: str, start: int) -> bool:
    return bool(NUMBER_CUE.search(text[max(0, start - 24):start]))


# --- person names and street addresses (heuristic) ----------------------------------------------------------------

UPPER, LOWER = "A-ZÀ-ÖØ-Þ", "a-zß-öø-ÿ"
# Maria, McDonald, Jean-Luc, O'Brien, or an initial "J."
NAME_WORD = (rf"(?:[{UPPER}][{LOWER}]+(?:[{UPPER}][{LOWER}]+)?(?:['’-][{UPPER}][{LOWER}]+)?"
             rf"|[{UPPER}]['’][{UPPER}][{LOWER}]+|[{UPPER}]\.)")
HONORIFIC = re.compile(rf"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Dame|Madam|Mme|Mlle|Herr|Frau)\.?[ \t]+"
                       rf"({NAME_WORD}(?:[ \t]+{NAME_WORD}){{0,2}})")
NAME_CUE = re.compile(
    rf"(?:\b(?:Dear|[Cc]ontact|[Aa]sk for|[Ss]poke (?:with|to)|[Ss]igned|[Rr]egards|[Ss]incerely|[Tt]hanks|"
    rf"[Mm]y name is|[Nn]amed|[Cc]all|[Ee]mail|[Ww]rite to|[Aa]ssigned to|[Mm]eet|"
    rf"(?:[Rr]eported|[Ww]ritten|[Ss]igned|[Ss]ubmitted|[Pp]repared|[Aa]pproved|[Tt]aken|[Rr]equested|[Ff]iled)"
    rf" by)[,:]?"
    # "to", "from", "with" alone are too common ("went to New York"); as header labels they need their colon
    rf"|\b(?:From|To|Cc|Attn|Attention|Patient|Customer|Client|Applicant|Tenant|Owner|Resident|Employee|Manager|"
    rf"Caller|Requester|Name|Contact)\s*:)\s+"
    rf"({NAME_WORD}[ \t]+{NAME_WORD}(?:[ \t]+{NAME_WORD})?)\b")
# capitalized words that make "Contact City Hall" an organisation or a place, not a person
NOT_NAME_WORDS = {
    "The", "A", "An", "Our", "Your", "This", "That", "Please", "City", "Town", "County", "State", "Department",
    "Dept", "Office", "Center", "Centre", "Services", "Service", "Library", "Parks", "Street", "Avenue",
    "Road", "Public", "Works", "Customer", "Support", "Team", "Desk", "Police", "Fire", "Court", "Clerk", "Council",
    "Board", "Division", "Bureau", "Agency", "Program", "Recreation", "Water", "Sewer", "Transit", "Animal",
    "Control", "University", "School", "College", "Hospital", "Clinic", "Bank", "Inc", "LLC", "Ltd", "Corp",
    "Company", "Group", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "January",
    "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December",
    "Mayor", "Manager", "Emergency", "Management", "Housing", "Authority", "Building", "Permits",
    "Permit", "Code", "Enforcement", "Tax", "Assessor", "Treasurer", "Elections", "Registrar", "Senior", "Youth",
    "Community", "Health", "Human", "Resources", "Finance", "Planning", "Zoning", "Records", "Vital", "Help",
    "Line", "Hotline", "Us", "We", "Information", "Info", "Sales", "Billing", "Account", "Accounts",
    "Mr", "Mrs", "Ms", "Dr", "North", "South", "East", "West", "New", "Maplewood", "Google", "Microsoft", "Apple",
    "Amazon", "Visa", "Mastercard", "Note", "Thank", "Thanks", "Best", "Kind", "Dear", "Hi", "Hello", "Regards",
    "Foundation", "Developers", "Commons", "Project", "Contributors", "Software", "Systems", "Labs", "Institute",
    "Association", "Society", "Consortium", "Authors", "Apache", "Free", "Open", "Source", "License", "Eligible",
}
STREET_SUFFIXES = (
    "Street", "St", "Avenue", "Ave", "Road", "Rd", "Boulevard", "Blvd", "Lane", "Ln", "Drive", "Dr", "Court", "Ct",
    "Way", "Place", "Pl", "Terrace", "Ter", "Circle", "Cir", "Parkway", "Pkwy", "Highway", "Hwy", "Square", "Sq",
    "Trail", "Trl", "Alley", "Crescent", "Close", "Row", "Plaza", "Loop", "Pike", "Turnpike", "Expressway",
    "Freeway", "Crossing", "Path", "Walk", "Grove", "Gardens", "Heights", "Hill", "Hills", "Ridge", "View", "Vista",
    "Meadow", "Meadows", "Manor", "Mews", "Point", "Port", "Ports", "Harbor", "Harbors", "Landing", "Glen", "Green",
    "Commons", "Estates", "Fields", "Forest", "Canyon", "Creek", "Curve", "Bend", "Cove", "Hollow", "Junction",
    "Mission", "Oval", "Passage", "Ramp", "Ranch", "Route", "Shore", "Shores", "Spring", "Springs", "Station",
    "Stravenue", "Summit", "Trace", "Track", "Tunnel", "Valley", "Village", "Villages", "Ville", "Wells", "Underpass",
    "Overpass", "Skyway", "Throughway", "Trafficway", "Viaduct", "Via", "Bypass", "Causeway", "Extension", "Fork",
    "Forks", "Ford", "Fords", "Island", "Islands", "Lakes", "Lake", "Light", "Lights", "Locks", "Lodge", "Mill",
    "Mills", "Mount", "Mountain", "Orchard", "Pines", "Plains", "Prairie", "Radial", "Rapids", "Shoal", "Shoals",
    "Spur", "Stream", "Brook", "Brooks", "Burg", "Burgs", "Camp", "Cape", "Cliff", "Cliffs", "Club", "Corner",
    "Corners", "Course", "Courts", "Coves", "Crest", "Dale", "Divide", "Drives", "Estate", "Falls", "Ferry", "Field",
    "Flat", "Flats", "Forge", "Forges", "Fort", "Garden", "Gateway", "Glens", "Greens", "Groves", "Haven", "Inlet",
    "Isle", "Junctions", "Knoll", "Knolls", "Neck", "Parkways", "Plain", "Points", "Rapid", "Ridges", "Roads",
    "Rue", "Squares", "Streets", "Unions", "Valleys", "Views", "Walks", "Ways", "Branch", "Bridge", "Centers",
    "Circles", "Common", "Crossroad", "Extensions", "Keys", "Mountains", "Pine", "Center", "Parks", "Park", "Mall",
    "Land", "Well", "Wall", "Key", "Loaf", "Lock", "Mountain", "Pass", "Pines", "Rest", "Run", "Union", "Fall",
    "Dam", "Manors", "Motorway", "River", "Spurs",
)
ABBREVIATED_SUFFIXES = {"St", "Ave", "Rd", "Blvd", "Ln", "Dr", "Ct", "Pl", "Ter", "Cir", "Pkwy", "Hwy", "Sq", "Trl"}
YEAR_CUE = re.compile(r"(?:\b(?:in|since|by|from|until|till|before|after|of|during|around|circa|year|copyright)|"
                      r"\(c\)|©)[\s,:]+(?:\d{4}\s*[-–,]\s*)*$", re.IGNORECASE)
ADDRESS = re.compile(
    rf"(?<![\w.,-])\d{{1,6}}[A-Za-z]?[ \t]+(?:(?:N|S|E|W|NE|NW|SE|SW|North|South|East|West)\.?[ \t]+)?"
    rf"(?:(?:[{UPPER}][{LOWER}]+|\d+(?:st|nd|rd|th))[ \t]+){{1,3}}"
    rf"(?:{'|'.join(sorted(STREET_SUFFIXES, key=len, reverse=True))})\b\.?"
    rf"(?:,?[ \t]+(?:Apt|Apartment|Suite|Ste|Unit|Fl|Floor|Room|Rm|#)\.?[ \t]*#?[A-Za-z0-9-]+)?"
    rf"(?:(?:,[ \t]*|\n)[{UPPER}][{LOWER}]+(?:[ \t]+[{UPPER}][{LOWER}]+)*,[ \t]+[A-Z]{{2}}[ \t]+\d{{5}}(?:-\d{{4}})?)?")


def find_people(text: str) -> Iterator[Finding]:
    for pattern in (HONORIFIC, NAME_CUE):
        for match in pattern.finditer(text):
            words = match.group(1).split()
            while words and words[-1].rstrip(".") in NOT_NAME_WORDS:
                words.pop()
            if not words or any(word.rstrip(".") in NOT_NAME_WORDS for word in words):
                continue
            if pattern is NAME_CUE and len(words) < 2:
                continue
            name = " ".join(words)
            start = match.start(1)
            yield Finding("PERSON", start, start + len(name), name)


def find_addresses(text: str) -> Iterator[Finding]:
    for match in ADDRESS.finditer(text):
        house = re.match(r"\d+", match.group())
        assert house is not None  # ADDRESS starts with the house number
        number = house.group()
        if len(number) == 4 and number[:2] in ("19", "20") and YEAR_CUE.search(text[max(0, match.start() - 40):
                                                                                       match.start()]):
            continue  # "since 2007 Central Park has ...", "(C) 2004 David Lodge" are years, not house numbers
        address = match.group().rstrip()
        if address.endswith(".") and address[:-1].split()[-1] not in ABBREVIATED_SUFFIXES:
            address = address[:-1]  # the sentence's full stop, not "St."
        yield Finding("ADDRESS", match.start(), match.start() + len(address), address)


# --- combining the detectors --------------------------------------------------------------------------------------

# Order is priority when two findings overlap: a card inside a URL token is the token; an email beats the phone-
# shaped digits in its local part; the number in a street address is not a phone.
DETECTORS = (("URL_TOKEN", find_url_tokens), ("EMAIL", find_emails), ("IBAN", find_ibans),
             ("CREDIT_CARD", find_credit_cards), ("SSN", find_ssns), ("IP_ADDRESS", find_ips),
             ("ADDRESS", find_addresses), ("PHONE", find_phones), ("PERSON", find_people))
# digit runs in a URL's path or query are ids, not phone or card numbers; only these types are looked for there
INSIDE_URL = {"URL_TOKEN", "EMAIL", "IP_ADDRESS"}


def detect(text: str, types: Iterable[str] = TYPES) -> list[Finding]:
    """All findings of the chosen types, without overlaps, in text order."""
    wanted = set(types)
    urls = list(_urls(text))
    taken: list[Finding] = []
    for kind, finder in DETECTORS:
        if kind not in wanted:
            continue
        found = sorted(finder(text), key=lambda f: (f.start, -(f.end - f.start)))
        for finding in found:
            if kind not in INSIDE_URL and any(s < finding.end and finding.start < e for s, e in urls):
                continue
            if not any(other.start < finding.end and finding.start < other.end for other in taken):
                taken.append(finding)
    return sorted(taken, key=lambda f: f.start)


# --- replacements -------------------------------------------------------------------------------------------------

class PiiRedactor:
    """Apply one mode to text, keeping a running count of findings by type across every call."""

    def __init__(self, mode: str = "redact", types: Iterable[str] | None = None, *, secret: str | bytes | None = None,
                 keep: Iterable[str] = ()):
        if mode not in MODES:
            raise TailorError(f"pii mode must be one of {', '.join(MODES)} (found {mode!r})")
        self.mode = mode
        self.types = tuple(types) if types is not None else TYPES
        unknown = [t for t in self.types if t not in TYPES]
        if unknown:
            raise TailorError(f"pii types: unknown {', '.join(unknown)} (known: {', '.join(TYPES)})")
        secret = secret if secret is not None else os.environ.get("TAILOR_PII_SECRET", DEFAULT_SECRET)
        self._key = secret.encode() if isinstance(secret, str) else secret
        self.keep = []
        for pattern in keep:
            try:
                self.keep.append(re.compile(pattern))
            except re.error as exc:
                raise TailorError(f"pii_keep: {pattern!r} is not a valid regular expression ({exc})") from None
        self.counts: Counter[str] = Counter()
        self.kept: Counter[str] = Counter()

    def apply(self, text: str, public: str = "") -> tuple[str, list[Finding]]:
        """The text with findings replaced, and the findings (offsets in the original text) that were replaced.
        A finding that `public` holds word for word stays (an answer quoting the documents it was given)."""
        replaced, pieces, position = [], [], 0
        for finding in detect(text, self.types):
            if any(pattern.search(finding.text) for pattern in self.keep) or (public and finding.text in public):
                self.kept[finding.type] += 1
                continue
            pieces += [text[position:finding.start], self.replacement(finding)]
            position = finding.end
            replaced.append(finding)
            self.counts[finding.type] += 1
        pieces.append(text[position:])
        return "".join(pieces), replaced

    def report(self) -> dict:
        return {"mode": self.mode, "counts": dict(sorted(self.counts.items())),
                "kept": dict(sorted(self.kept.items()))}

    def replacement(self, finding: Finding) -> str:
        if self.mode == "redact":
            return f"<{finding.type}>"
        if self.mode == "mask":
            return mask(finding)
        return self._pseudonym(finding)

    # pseudonyms ---------------------------------------------------------------------------------------------------

    def _number(self, kind: str, canonical: str) -> int:
        """A keyed hash of the value as a big integer: the same value always gives the same pseudonym."""
        digest = hmac.new(self._key, f"{kind}\0{canonical}".encode(), hashlib.sha256).digest()
        return int.from_bytes(digest, "big")

    def _pseudonym(self, finding: Finding) -> str:
        raw = finding.text
        kind = finding.type
        if kind == "EMAIL":
            return f"user{self._number(kind, raw.lower()) % 10**6:06d}@example.com"
        if kind == "PHONE":
            number = self._number(kind, _phone_key(raw))
            area = 201 + number % 789  # a plausible area code; 555-01xx is reserved for fiction in every one
            line = f"555-01{number // 1000 % 100:02d}"
            return f"+1 {area}-{line}" if raw.startswith("+") else f"({area}) {line}"
        if kind == "CREDIT_CARD":
            digits = re.sub(r"\D", "", raw)
            prefix = {15: "37", 14: "36"}.get(len(digits), "4")  # Amex, Diners, else Visa: a real network prefix
            body = prefix + f"{self._number(kind, digits):040d}"[-(len(digits) - len(prefix) - 1):]
            return _reshape(raw, body + _luhn_digit(body))
        if kind == "IBAN":
            compact = re.sub(r"[ -]", "", raw)
            bban = f"{self._number(kind, compact):080d}"[-(len(compact) - 4):]
            return _reshape(raw, compact[:2] + _iban_check(compact[:2], bban) + bban)
        if kind == "IP_ADDRESS":
            number = self._number(kind, raw.lower())
            if ":" in raw:
                return f"2001:db8::{number >> 16 & 0xFFFF:x}:{number & 0xFFFF:x}"
            return f"192.0.2.{1 + number % 254}"
        if kind == "SSN":
            digits = re.sub(r"\D", "", raw)
            padded = f"{self._number(kind, digits):020d}"
            fake = f"9{padded[-2:]}{padded[-4:-2]}{padded[-8:-4]}"  # area 9xx is never issued to a person
            return _reshape(raw, fake)
        if kind == "URL_TOKEN":
            return hmac.new(self._key, raw.encode(), hashlib.sha256).hexdigest()[:max(8, min(len(raw), 40))]
        if kind == "PERSON":
            number = self._number(kind, raw)
            last = FAKE_LAST_NAMES[number % len(FAKE_LAST_NAMES)]
            if len(raw.split()) == 1:  # "Mr. Smith" stays a surname
                return last
            return f"{FAKE_FIRST_NAMES[number // 101 % len(FAKE_FIRST_NAMES)]} {last}"
        number = self._number(kind, raw)  # ADDRESS
        return (f"{10 + number % 9890} {FAKE_STREETS[number // 10007 % len(FAKE_STREETS)]} "
                f"{('Street', 'Avenue', 'Road', 'Lane')[number // 7 % 4]}")


FAKE_FIRST_NAMES = ("Alex", "Jordan", "Taylor", "Morgan", "Casey", "Riley", "Jamie", "Avery", "Quinn", "Robin",
                    "Sam", "Drew", "Kai", "Rowan", "Sasha", "Emery", "Noa", "Remy", "Ari", "Jules")
FAKE_LAST_NAMES = ("Ashdown", "Brightwater", "Calloway", "Dunmore", "Ellsworth", "Fairbanks", "Greyson", "Holloway",
                   "Ingram", "Jessop", "Kingsley", "Lockhart", "Merriweather", "Northcott", "Oakes", "Pemberton",
                   "Quill", "Radcliffe", "Sterling", "Thorne", "Underhill", "Vance", "Whitlock", "Yardley")
FAKE_STREETS = ("Juniper", "Hawthorn", "Sycamore", "Chestnut", "Magnolia", "Aspen", "Alder", "Larkspur", "Primrose",
                "Foxglove", "Bramble", "Thistle")


def _phone_key(raw: str) -> str:
    """The same number written two ways (+1 415 555 0132, (415) 555-0132) gets the same pseudonym."""
    try:
        return phonenumbers.format_number(phonenumbers.parse(raw, "US"), phonenumbers.PhoneNumberFormat.E164)
    except phonenumbers.NumberParseException:
        return re.sub(r"\D", "", raw)


def _luhn_digit(body: str) -> str:
    return next(d for d in "0123456789" if luhn_valid(body + d))


def _iban_check(country: str, bban: str) -> str:
    rearranged = bban + country + "00"
    remainder = int("".join(str(int(char, 36)) for char in rearranged)) % 97
    return f"{98 - remainder:02d}"


def _reshape(template: str, characters: str) -> str:
    """Pour `characters` into the letters and digits of `template`, keeping its spaces and dashes."""
    stream = iter(characters)
    return "".join(next(stream) if char.isalnum() else char for char in template)


def mask(finding: Finding) -> str:
    raw = finding.text
    if finding.type == "EMAIL":
        local, _, domain = raw.partition("@")
        head, _, tld = domain.rpartition(".")
        return f"{local[0]}{'*' * (len(local) - 1)}@{re.sub(r'[^.]', '*', head)}.{tld}"
    if finding.type in ("PHONE", "CREDIT_CARD", "SSN", "IBAN"):
        # the last four digits are what people use to tell their cards and numbers apart
        digit_positions = [i for i, char in enumerate(raw) if char.isdigit()]
        shown = set(digit_positions[-4:])
        if finding.type == "IBAN":
            shown |= {0, 1}  # the country
        return "".join(char if i in shown or not char.isalnum() else "*" for i, char in enumerate(raw))
    if finding.type == "PERSON":
        return " ".join(word[0] + re.sub(r"\w", "*", word[1:]) for word in raw.split(" "))
    return re.sub(r"\w", "*", raw)


def redact_text(text: str, mode: str = "redact", **options) -> str:
    """One-off convenience: the text with every finding replaced."""
    return PiiRedactor(mode, **options).apply(text)[0]
