"""The output filter: personal data in answers becomes placeholders (`<EMAIL>`, `<PHONE>`, … via data/pii.py), and
matches of the configured blocklist become `[blocked]`. Streamed answers pass through the same filter.

A stream cannot be filtered token by token: an e-mail address arrives in pieces and is only recognizable whole. So
the stream filter holds back the tail that may still grow into personal data (the last word, and before it any
word with a digit, an @, a capital, …: phone numbers, addresses and names; at most `HOLD` characters), and releases
the text before it only when filtering that text alone agrees with filtering the whole window, i.e. no finding
straddles the cut. The held tail goes out, filtered, when the answer ends.

Inputs get one check here too: `injection_pattern` names the prompt-injection pattern a client message matches
(e.g. "ignore all previous instructions"). The server counts matches in /metrics and does not refuse them: these
phrases are easy to write innocently ("how do I ignore the previous notice?" does not match, but a list like this
always has false positives), and a grounded model's instructions sit in the system turn the client cannot write
(security.py refuses template markers). The count is a signal for an operator to read the request log, not a wall.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tailor.data.pii import PiiRedactor
from tailor.errors import TailorError

BLOCKED = "[blocked]"
HOLD = 64  # longer than any personal-data value the detectors find (an IBAN is at most 42 characters)
EVERY = 8  # characters gathered between two filter runs (a token is ~4; each run costs about a millisecond)
WORD = re.compile(r"\S+")
# a word that may belong to personal data still being written: digits, e-mail and URL signs, capitalized names
SUSPICIOUS = re.compile(r"[0-9@:/#+()]|^[A-Z]|^\W*[A-Z]")


# name -> pattern; the names are the `pattern` label of tailor_prompt_injection_attempts_total, so keep them few
INJECTION_PATTERNS = {
    "ignore_instructions": re.compile(
        r"\b(ignore|disregard|forget|override)\b.{0,30}\b(previous|prior|above|earlier|all|your|system)\b.{0,20}"
        r"\b(instructions?|prompts?|rules|directions|guidelines)\b", re.IGNORECASE | re.DOTALL),
    "reveal_prompt": re.compile(
        r"\b(reveal|show|print|repeat|output|tell me)\b.{0,30}\b(system prompt|your (instructions|prompt|rules))\b",
        re.IGNORECASE | re.DOTALL),
    "role_override": re.compile(
        r"\b(you are now|from now on,? you are|act as|pretend to be)\b.{0,40}\b(unrestricted|unfiltered|jailbroken|"
        r"DAN|developer mode|without (any )?(rules|restrictions|filters))\b", re.IGNORECASE | re.DOTALL),
    "fake_turn": re.compile(r"(^|\n)\s*(system|assistant)\s*:\s*\S", re.IGNORECASE),
}


def injection_pattern(text: str) -> str | None:
    """The name of the first prompt-injection pattern `text` matches, or None."""
    return next((name for name, pattern in INJECTION_PATTERNS.items() if pattern.search(text)), None)


def held_tail(text: str) -> int:
    """How many characters at the end of `text` may still turn out to be (part of) personal data."""
    start = len(text)
    for position, match in enumerate(reversed(list(WORD.finditer(text, max(0, len(text) - HOLD - 1))))):
        if position > 0 and not SUSPICIOUS.search(match.group()):
            break
        start = match.start()
    return min(len(text) - start, HOLD)


class OutputFilter:
    def __init__(self, redact_pii: bool = True, blocklist: Sequence[str] = (), keep: Sequence[str] = ()):
        # `keep`: public contact data (a city's own phone lines) is what a city chatbot is for; it stays
        self.redactor = PiiRedactor("redact", keep=keep) if redact_pii else None
        self.blocklist = []
        for i, pattern in enumerate(blocklist):
            try:
                self.blocklist.append(re.compile(pattern, re.IGNORECASE))
            except re.error as exc:
                raise TailorError(f"serve.blocklist[{i}]: {pattern!r} is not a valid regular expression ({exc})") \
                    from None

    @property
    def active(self) -> bool:
        return self.redactor is not None or bool(self.blocklist)

    def apply(self, text: str, public: str = "") -> str:
        """`public`: text the answer may quote as it is (a grounded model's retrieved passages: the documents went
        through ingest's own personal-data step, so a phone number they print is public); the blocklist applies
        to it all the same."""
        for pattern in self.blocklist:
            text = pattern.sub(BLOCKED, text)
        if self.redactor is not None:
            text = self.redactor.apply(text, public)[0]
        return text

    def stream(self, public: str = "") -> StreamFilter:
        return StreamFilter(self, public)


class StreamFilter:
    """Feed raw deltas with `push`, send what it returns; `finish` returns the rest once the answer ends.

    Only a window at the end of the answer is re-filtered (O(length) overall, not O(length²)): once the window is
    long, it restarts after a sentence end more than 2 * HOLD characters back (detectors read cues such as "Dear"
    within a sentence, so a window starting mid-sentence could read a name differently)."""

    def __init__(self, output_filter: OutputFilter, public: str = ""):
        self.filter = output_filter
        self.public = public
        self.raw = ""
        self.anchor = 0  # the window is raw[anchor:]; raw[:anchor] went out as `frozen`
        self.frozen = ""
        self.sent = ""
        self.sent_raw = 0  # raw[:sent_raw] is what `sent` is the filtered form of
        self.filtered_at = 0  # len(raw) at the last filter run

    def push(self, delta: str) -> str:
        self.raw += delta
        if not self.filter.active:
            return self._release(self.raw, len(self.raw))
        if len(self.raw) - self.filtered_at < EVERY:
            return ""
        self.filtered_at = len(self.raw)
        window = self.raw[self.anchor:]
        cut = len(window) - held_tail(window)
        if cut <= 0:
            return ""
        whole, head = self.filter.apply(window, self.public), self.filter.apply(window[:cut], self.public)
        if not whole.startswith(head):  # a finding straddles the cut: wait until it is whole
            return ""
        released = self._release(self.frozen + head, self.anchor + cut)
        if len(window) > 3 * HOLD:
            ends = [m.end() for m in re.finditer(r"[.!?\n]\s+", window[:min(cut, len(window) - 2 * HOLD)])]
            if ends and whole.startswith(frozen_head := self.filter.apply(window[:ends[-1]], self.public)) and \
                    self.sent.startswith(self.frozen + frozen_head):
                self.anchor += ends[-1]
                self.frozen += frozen_head
        return released

    def finish(self) -> str:
        if not self.filter.active:
            return self._release(self.raw, len(self.raw))
        return self._release(self.frozen + self.filter.apply(self.raw[self.anchor:], self.public), len(self.raw))

    @property
    def text(self) -> str:
        """The filtered answer as sent so far (all of it after `finish`)."""
        return self.sent

    def _release(self, ready: str, raw_end: int) -> str:
        """Send what `ready` adds to what was sent. Should the filter now read earlier text differently (it cannot
        be unsent), the new raw text is filtered on its own instead: nothing is dropped, nothing waits forever."""
        if ready.startswith(self.sent):
            delta, self.sent = ready[len(self.sent):], ready
        else:
            delta = self.filter.apply(self.raw[self.sent_raw:raw_end], self.public)
            self.sent += delta
        self.sent_raw = max(self.sent_raw, raw_end)
        return delta
