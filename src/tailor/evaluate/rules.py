"""Guideline checks declared in `eval.rules`: which rules an answer breaks, and the adherence rates of a model.

The config validates every rule (kinds, values, regular expressions) when tailor.yaml loads, so nothing here can
fail on a rule after the models are loaded.
"""

from __future__ import annotations

import functools
import re

from tailor.config import RuleConfig

# what counts as citing a source when the rule lists none: a URL, "source:"/"sources:", a numbered reference
# like [1], or a document file name
_ANY_CITATION = re.compile(r"https?://\S+|\bsources?\s*:|\[\d+\]|\b[\w-]+\.(?:md|txt|pdf|html?|docx?)\b",
                           re.IGNORECASE)


@functools.lru_cache(maxsize=256)
def _pattern(expression: str) -> re.Pattern:
    return re.compile(expression)


def _texts(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def passes(rule: RuleConfig, answer: str) -> bool:
    lowered = answer.lower()
    if rule.kind == "must_contain":
        return all(text.lower() in lowered for text in _texts(rule.value))
    if rule.kind == "must_not_contain":
        return not any(text.lower() in lowered for text in _texts(rule.value))
    # RuleConfig checked each kind's value: a pattern for regex, a whole number for max_words
    if rule.kind == "regex":
        assert isinstance(rule.value, str)
        return _pattern(rule.value).search(answer) is not None
    if rule.kind == "max_words":
        assert isinstance(rule.value, int)
        return len(answer.split()) <= rule.value
    if rule.kind == "cites_source":
        if rule.value is None:
            return _ANY_CITATION.search(answer) is not None
        return any(source.lower() in lowered for source in _texts(rule.value))
    raise ValueError(f"unknown rule kind {rule.kind!r}")  # the config's Literal makes this unreachable


def broken_rules(rules: list[RuleConfig], answer: str) -> list[str]:
    """Names of the rules `answer` breaks, in config order."""
    return [rule.name for rule in rules if not passes(rule, answer)]


def adherence(rules: list[RuleConfig], broken_per_answer: list[list[str]]) -> dict:
    """{"adherence": share of answers breaking no rule, "rules": {name: share of answers passing it}}."""
    total = len(broken_per_answer)
    if not rules or not total:
        return {}
    return {"adherence": round(sum(not broken for broken in broken_per_answer) / total, 4),
            "rules": {rule.name: round(sum(rule.name not in broken for broken in broken_per_answer) / total, 4)
                      for rule in rules}}
