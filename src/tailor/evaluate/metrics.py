"""Answer metrics on SQuAD's normalization (lowercase, no punctuation, no articles, single spaces).

Every metric sees the same normalized tokens, so "The permit costs $45." and "permit costs 45" agree everywhere.
Scores are between 0 and 1 (BLEU too: sacrebleu's 0-100 divided by 100). An empty prediction matches only an empty
reference, as in SQuAD's F1.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)  # one row of the LCS table: answers are short, so O(len(a) * len(b)) is fine
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (Lin, 2004; beta = 1): the longest common token subsequence over both lengths.

    Written here rather than taken from rouge-score, which imports NLTK (seconds) for a stemmer we do not use;
    the tests check it against rouge-score on the same tokens.
    """
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = _lcs_length(predicted, expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def _bleu_scorer():
    from sacrebleu.metrics import BLEU

    # tokens are already normalized; "exp" smoothing and effective order keep answers shorter than four words from
    # scoring 0 just because they have no 4-gram (Chen & Cherry, 2014, method 3 as in mteval)
    return BLEU(tokenize="none", smooth_method="exp", effective_order=True)


def sentence_bleu(prediction: str, reference: str) -> float:
    """BLEU-4 of one answer against its reference (smoothed), for the per-example scores."""
    predicted, expected = normalize_answer(prediction), normalize_answer(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    return _bleu_scorer().sentence_score(predicted, [expected]).score / 100


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 with brevity penalty: n-gram counts summed over all answers, then one geometric mean."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    predicted = [normalize_answer(p) for p in predictions]
    expected = [normalize_answer(r) for r in references]
    if not any(predicted) or not any(expected):
        return float(predicted == expected)
    return _bleu_scorer().corpus_score(predicted, [expected]).score / 100


def bleu_signature() -> str:
    """sacrebleu's description of the settings, saved in the report so a BLEU number can be reproduced."""
    scorer = _bleu_scorer()
    scorer.corpus_score(["a"], [["a"]])  # sacrebleu knows the number of references only after scoring
    return str(scorer.get_signature())
