"""The part of PromQL that tailor's alerting rules use, parsed and evaluated by hand, so `tailor monitor` checks the
same expressions as Prometheus without running one.

The subset, in full (anything else is refused with the rule's name and what is not supported):

    alert      := condition ("and" condition)*
    condition  := value OP NUMBER                       OP: >  >=  <  <=  ==  !=
    value      := aggregate ["/" aggregate]
    aggregate  := "sum" ["by" "(" labels ")"] "(" range ")"
                | "histogram_quantile" "(" NUMBER "," "sum" "by" "(" labels ")" "(" range ")" ")"
    range      := ("rate" | "increase") "(" selector "[" DURATION "]" ")"
    selector   := METRIC ["{" LABEL ("=" | "!=" | "=~" | "!~") "STRING" ("," ...)* "}"]

with the rules that keep every part of an expression on the same series: the two sides of "/" and every
condition of an "and" group by the same labels; histogram_quantile's labels include `le` and its metric ends in
`_bucket`. DURATION is a number and one of s, m, h, d.

Semantics follow Prometheus: "/" matches series with identical labels (x/0 is +Inf, 0/0 NaN); a comparison keeps
the series for which it holds (NaN never does); "and" keeps the left series whose labels the right side also has;
histogram_quantile interpolates linearly inside the bucket the rank falls in (the highest finite bound when it
falls in +Inf, NaN without observations). How a range is measured is the caller's `Source`: check.py offers the
increase between two scrapes `--interval` seconds apart, or the totals since the server started, instead of the
rule's own window (see `Source`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs: one series' identity
Vector = dict[Labels, float]

COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
TOKEN = re.compile(r"""\s*(?:
    (?P<duration>\d+[smhd](?![a-zA-Z0-9_]))
  | (?P<number>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?(?![a-zA-Z0-9_.]))
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>>=|<=|==|!=|=~|!~|[><=/(){}\[\],])
)""", re.VERBOSE)


class PromQLError(ValueError):
    """An expression outside the supported subset (the message says what and where)."""


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str  # = != =~ !~
    value: str

    def matches(self, labels: dict[str, str]) -> bool:
        found = labels.get(self.label, "")
        if self.op in ("=", "!="):
            return (found == self.value) == (self.op == "=")
        return bool(re.fullmatch(self.value, found)) == (self.op == "=~")  # PromQL anchors its regexes


@dataclass(frozen=True)
class Range:
    """`rate(selector[window])` or `increase(...)`."""

    function: str
    metric: str
    matchers: tuple[Matcher, ...]
    window: float  # seconds


@dataclass(frozen=True)
class Aggregate:
    range: Range
    by: tuple[str, ...]  # () is `sum(...)`: one series without labels
    quantile: float | None = None  # set for histogram_quantile


@dataclass(frozen=True)
class Value:
    numerator: Aggregate
    denominator: Aggregate | None = None

    @property
    def aggregates(self) -> tuple[Aggregate, ...]:
        return (self.numerator,) if self.denominator is None else (self.numerator, self.denominator)

    def grouping(self) -> tuple[str, ...]:
        a = self.numerator
        return tuple(label for label in a.by if label != "le") if a.quantile is not None else a.by


@dataclass(frozen=True)
class Condition:
    value: Value
    op: str
    threshold: float


@dataclass(frozen=True)
class Alert:
    """A parsed alert expression: its conditions, all of which must hold for a series to fire."""

    conditions: tuple[Condition, ...]

    @property
    def metrics(self) -> set[str]:
        return {a.range.metric for c in self.conditions for a in c.value.aggregates}

    @property
    def ranges(self) -> list[Range]:
        return [a.range for c in self.conditions for a in c.value.aggregates]


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match:
        raise PromQLError(f"{text!r} is not a duration (a number and one of s, m, h, d, e.g. 5m)")
    return int(match.group(1)) * UNITS[match.group(2)]


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, str]] = []
        position = 0
        while position < len(text):
            match = TOKEN.match(text, position)
            if match is None or match.end() == position:
                if text[position:].strip() == "":
                    break
                raise PromQLError(f"cannot read {text[position:position + 20].strip()!r}")
            kind = match.lastgroup
            assert kind is not None  # each alternative of TOKEN is a named group
            self.tokens.append((kind, match.group(kind)))
            position = match.end()
        self.at = 0

    def peek(self) -> str | None:
        return self.tokens[self.at][1] if self.at < len(self.tokens) else None

    def take(self, expected: str | None = None, kind: str | None = None) -> str:
        if self.at >= len(self.tokens):
            raise PromQLError(f"ends early; expected {expected or kind}")
        token_kind, token = self.tokens[self.at]
        if (expected is not None and token != expected) or (kind is not None and token_kind != kind):
            raise PromQLError(f"expected {expected or kind} but found {token!r} (outside the supported subset)")
        self.at += 1
        return token

    def alert(self) -> Alert:
        conditions = [self.condition()]
        while self.peek() == "and":
            self.take("and")
            conditions.append(self.condition())
        if self.peek() is not None:
            raise PromQLError(f"unexpected {self.peek()!r} (outside the supported subset)")
        groupings = {c.value.grouping() for c in conditions}
        if len(groupings) > 1:
            raise PromQLError(f"the conditions joined by 'and' group by different labels {sorted(groupings)}")
        return Alert(tuple(conditions))

    def condition(self) -> Condition:
        value = self.value()
        op = self.take(kind="op")
        if op not in COMPARISONS:
            raise PromQLError(f"expected a comparison (> >= < <= == !=) but found {op!r}")
        return Condition(value, op, float(self.take(kind="number")))

    def value(self) -> Value:
        numerator = self.aggregate()
        if self.peek() != "/":
            return Value(numerator)
        self.take("/")
        denominator = self.aggregate()
        if Value(numerator).grouping() != Value(denominator).grouping():
            raise PromQLError("the two sides of '/' group by different labels")
        return Value(numerator, denominator)

    def aggregate(self) -> Aggregate:
        if self.peek() == "histogram_quantile":
            self.take("histogram_quantile")
            self.take("(")
            quantile = float(self.take(kind="number"))
            if not 0 <= quantile <= 1:
                raise PromQLError(f"histogram_quantile's quantile {quantile} is not between 0 and 1")
            self.take(",")
            inner = self.sum()
            self.take(")")
            if "le" not in inner.by or not inner.range.metric.endswith("_bucket"):
                raise PromQLError("histogram_quantile needs sum by (..., le) over a *_bucket metric")
            return Aggregate(inner.range, inner.by, quantile)
        return self.sum()

    def sum(self) -> Aggregate:
        self.take("sum")
        by: list[str] = []
        if self.peek() == "by":
            self.take("by")
            self.take("(")
            by.append(self.take(kind="name"))
            while self.peek() == ",":
                self.take(",")
                by.append(self.take(kind="name"))
            self.take(")")
        self.take("(")
        function = self.take(kind="name")
        if function not in ("rate", "increase"):
            raise PromQLError(f"only rate(...) and increase(...) may be summed, not {function}(...)")
        self.take("(")
        metric = self.take(kind="name")
        matchers = []
        if self.peek() == "{":
            self.take("{")
            while self.peek() != "}":
                label = self.take(kind="name")
                op = self.take(kind="op")
                if op not in ("=", "!=", "=~", "!~"):
                    raise PromQLError(f"{label}: {op!r} is not a label matcher")
                matchers.append(Matcher(label, op, self.take(kind="string")[1:-1].encode().decode("unicode_escape")))
                if self.peek() == ",":
                    self.take(",")
            self.take("}")
        self.take("[")
        window = parse_duration(self.take(kind="duration"))
        self.take("]")
        self.take(")")
        self.take(")")
        return Aggregate(Range(function, metric, tuple(matchers), window), tuple(by))


def parse(text: str) -> Alert:
    """The expression as an Alert; PromQLError when it is outside the subset."""
    return _Parser(text).alert()


class Source(Protocol):
    """How much each series of a counter grew over a range, and over how many seconds (rate = increase / seconds)."""

    def increase(self, range_: Range) -> tuple[dict[Labels, float], float]: ...


def _sum(aggregate: Aggregate, source: Source) -> Vector:
    series, seconds = source.increase(aggregate.range)
    grouped: Vector = {}
    for labels, grown in series.items():
        found = dict(labels)
        if not all(m.matches(found) for m in aggregate.range.matchers):
            continue
        key = tuple(sorted((label, found[label]) for label in aggregate.by if found.get(label, "") != ""))
        grouped[key] = grouped.get(key, 0.0) + (grown / seconds if aggregate.range.function == "rate" else grown)
    return grouped


def histogram_quantile(quantile: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' estimate from cumulative (upper bound, count) pairs."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][0] != math.inf or buckets[-1][1] <= 0:
        return math.nan
    rank = quantile * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for i, (bound, count) in enumerate(buckets):
        if count >= rank:
            if bound == math.inf:
                return buckets[i - 1][0] if i else math.nan
            if i == 0 and bound <= 0:
                return bound
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / (count - lower_count or 1))
        lower_bound, lower_count = bound, count
    return math.nan


def _aggregate(aggregate: Aggregate, source: Source) -> Vector:
    summed = _sum(aggregate, source)
    if aggregate.quantile is None:
        return summed
    histograms: dict[Labels, list[tuple[float, float]]] = {}
    for labels, count in summed.items():
        rest = tuple(pair for pair in labels if pair[0] != "le")
        histograms.setdefault(rest, []).append((float(dict(labels)["le"]), count))
    return {labels: histogram_quantile(aggregate.quantile, buckets) for labels, buckets in histograms.items()}


def _divide(a: float, b: float) -> float:
    if b == 0:
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)
    return a / b


def evaluate_value(value: Value, source: Source) -> Vector:
    numerator = _aggregate(value.numerator, source)
    if value.denominator is None:
        return numerator
    denominator = _aggregate(value.denominator, source)
    return {labels: _divide(v, denominator[labels]) for labels, v in numerator.items() if labels in denominator}


def evaluate(alert: Alert, source: Source) -> tuple[Vector, set[Labels]]:
    """The first condition's value per series (what the alert measures) and the series for which every condition
    holds (those that fire)."""
    shown = evaluate_value(alert.conditions[0].value, source)
    firing: set[Labels] | None = None
    for condition in alert.conditions:
        values = shown if condition is alert.conditions[0] else evaluate_value(condition.value, source)
        holding = {labels for labels, v in values.items() if COMPARISONS[condition.op](v, condition.threshold)}
        firing = holding if firing is None else firing & holding
    return shown, firing or set()
