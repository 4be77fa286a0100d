"""Answer metrics against hand-computed values and the reference libraries; guideline rules (gates: test_gates.py).

No model here: these run in milliseconds. The tiny-model evaluation is in test_eval_report.py.
"""

import math

import pytest

from tailor.config import validate_config
from tailor.errors import TailorError
from tailor.evaluate.metrics import corpus_bleu, exact_match, normalize_answer, rouge_l, sentence_bleu, token_f1
from tailor.evaluate.rules import adherence, broken_rules


def test_normalization_follows_squad():
    assert normalize_answer("The Library, is OPEN!") == "library is open"


@pytest.mark.parametrize("prediction, reference, f1", [
    ("open 9 am to 7 pm", "open 9 am to 7 pm", 1.0),
    ("open 9 to 5", "open 9 am to 7 pm", 2 * (3 / 4) * (3 / 6) / (3 / 4 + 3 / 6)),  # 3 shared of 4 and 6
    ("closed", "open", 0.0),
    ("", "", 1.0),
    ("", "open", 0.0),
])
def test_token_f1_by_hand(prediction, reference, f1):
    assert token_f1(prediction, reference) == pytest.approx(f1)


def test_exact_match_ignores_case_punctuation_articles():
    assert exact_match("The permit costs $45.", "permit costs 45") == 1.0
    assert exact_match("The permit costs $46.", "permit costs 45") == 0.0


@pytest.mark.parametrize("prediction, reference, expected", [
    ("open 9 am to 7 pm", "open 9 am to 7 pm", 1.0),
    ("open 9 to 5", "open 9 am to 7 pm", 0.6),  # LCS "open 9 to" = 3: P 3/4, R 3/6, F 0.6
    ("pm 7 to am 9 open", "open 9 am to 7 pm", 1 / 6),  # same bag of words (token F1 = 1), order reversed: LCS 1
    ("The Permit, costs $45", "permit costs 45", 1.0),  # normalized like token F1
    ("closed", "open", 0.0),
    ("", "", 1.0),
    ("", "open", 0.0),
])
def test_rouge_l_by_hand(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)


REFERENCE = "open monday to friday from 8 am to 5 pm"  # 10 tokens
PREDICTION = "open monday to friday 8 am to 5 pm"  # 9 tokens; n-gram matches 9/9, 7/8, 5/7, 3/6


def test_sentence_bleu_by_hand():
    brevity = math.exp(1 - 10 / 9)
    assert sentence_bleu(PREDICTION, REFERENCE) == pytest.approx(brevity * (1 * 7 / 8 * 5 / 7 * 3 / 6) ** 0.25)
    assert sentence_bleu("The Permit costs $45.", "permit costs 45") == pytest.approx(1.0)
    # two words, no bigram in common: "exp" smoothing gives the empty order 1/(2 * 1), and with no 3- or 4-grams
    # the mean runs over orders 1-2 only: sqrt(1/2 * 1/2), not 0
    assert sentence_bleu("open now", "open later") == pytest.approx(0.5)
    assert sentence_bleu("", "") == 1.0 and sentence_bleu("", "open") == 0.0


def test_corpus_bleu_pools_ngram_counts_by_hand():
    # pooled matches: 1-grams 9+1 of 9+2, 2-grams 7+0 of 8+1, 3-grams 5 of 7, 4-grams 3 of 6; lengths 11 vs 12
    expected = math.exp(1 - 12 / 11) * (10 / 11 * 7 / 9 * 5 / 7 * 3 / 6) ** 0.25
    assert corpus_bleu([PREDICTION, "open now"], [REFERENCE, "open later"]) == pytest.approx(expected)
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [])


LIBRARY_CASES = [
    (PREDICTION, REFERENCE),
    ("the pool opens at 6 am on weekdays", "pool opens at 6 am weekdays and 8 am on weekends"),
    ("call the city hall main line at 555 201 4400", "call city hall main line at 555 201 4400"),
    ("bulky items are picked up on the first monday", "bulky item pickup is on first monday of each month"),
]


def test_bleu_matches_sacrebleu():
    import sacrebleu

    predictions, references = zip(*LIBRARY_CASES, strict=True)
    normalized = [normalize_answer(p) for p in predictions], [normalize_answer(r) for r in references]
    # sacrebleu's standard corpus BLEU (13a tokenizer, exp smoothing) on the same normalized words
    assert corpus_bleu(list(predictions), list(references)) == pytest.approx(
        sacrebleu.corpus_bleu(normalized[0], [normalized[1]]).score / 100)
    for prediction, reference in zip(*normalized, strict=True):
        assert sentence_bleu(prediction, reference) == pytest.approx(
            sacrebleu.sentence_bleu(prediction, [reference]).score / 100)


def test_rouge_l_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for prediction, reference in [*LIBRARY_CASES, ("pm 7 to am 9 open", "open 9 am to 7 pm")]:
        expected = scorer.score(normalize_answer(reference), normalize_answer(prediction))["rougeL"].fmeasure
        assert rouge_l(prediction, reference) == pytest.approx(expected)


# ---- rules -----------------------------------------------------------------------------------------------------

RULES = [
    {"name": "names-city", "kind": "must_contain", "value": "Maplewood"},
    {"name": "no-guessing", "kind": "must_not_contain", "value": ["I think", "probably"]},
    {"name": "phone-format", "kind": "regex", "value": r"\(\d{3}\) \d{3}-\d{4}"},
    {"name": "short", "kind": "max_words", "value": 8},
    {"name": "cites-docs", "kind": "cites_source", "value": ["city-hall.md", "maplewood.gov"]},
    {"name": "cites-any", "kind": "cites_source"},
]


def rules_of(rules):
    return validate_config({"eval": {"rules": rules}}).eval.rules


@pytest.mark.parametrize("answer, broken", [
    ("Call Maplewood at (555) 201-4400, see city-hall.md.", []),
    ("maplewood: (555) 201-4400 (source: maplewood.gov)", []),  # case-insensitive texts
    ("I think Maplewood: (555) 201-4400 [1] MAPLEWOOD.GOV", ["no-guessing"]),
    ("Call (555) 201-4400.", ["names-city", "cites-docs", "cites-any"]),
    ("Maplewood City Hall main line is 555 201 4400 as city-hall.md says", ["phone-format", "short"]),
    ("", ["names-city", "phone-format", "cites-docs", "cites-any"]),
])
def test_rules_on_synthetic_answers(answer, broken):
    assert broken_rules(rules_of(RULES), answer) == broken


def test_adherence_rates():
    rules = rules_of(RULES[:2])
    per_answer = [broken_rules(rules, a) for a in ["Maplewood", "probably Maplewood", "nothing", "Maplewood ok"]]
    assert adherence(rules, per_answer) == {"adherence": 0.5, "rules": {"names-city": 0.75, "no-guessing": 0.75}}
    assert adherence([], per_answer) == {}


@pytest.mark.parametrize("rule, message", [
    ({"name": "phone", "kind": "regex", "value": "(555"}, "eval.rules.1: rule 'phone': invalid regular expression"),
    ({"name": "short", "kind": "max_words", "value": 0}, "eval.rules.1: rule 'short': max_words needs a positive"),
    ({"name": "x", "kind": "must_contain", "value": []}, "eval.rules.1: rule 'x': must_contain needs"),
    ({"name": "x", "kind": "must_contain"}, "eval.rules.1: rule 'x': must_contain needs"),
    ({"name": "x", "kind": "shorter_than", "value": 3}, "eval.rules.1.kind: Input should be"),
    ({"kind": "regex", "value": "a"}, "eval.rules.1.name: Field required"),
    ({"name": "names-city", "kind": "max_words", "value": 3}, "rule names must be unique (repeated: names-city)"),
])
def test_bad_rules_name_the_key(rule, message):
    with pytest.raises(TailorError) as error:
        validate_config({"eval": {"rules": [RULES[0], rule]}})
    assert message in str(error.value)
