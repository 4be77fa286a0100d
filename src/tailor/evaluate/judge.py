"""LLM-as-judge: a rubric scored 1-5 and pairwise preference, by any model tailor loads or an endpoint.

A local judge is not asked to write a number that is then parsed: its score is the most likely of the options
"1".."5" (and the expected score under those probabilities is reported beside it). An endpoint judge writes its
verdict; the first number is read and clamped to 1-5, and answers without one are counted as unparsed.

Pairwise judging asks every question twice, with the two answers in both orders: judges prefer one position
(Zheng et al., 2023, "Judging LLM-as-a-Judge"), so a verdict counts only when both orders agree; the report gives
that agreement rate and the win / tie / loss shares.
"""

from __future__ import annotations

import re
from typing import Any

SCORES = ["1", "2", "3", "4", "5"]
CHOICES = ["A", "B"]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_CHOICE = re.compile(r"\b([AB])\b")


def parse_score(text: str) -> int | None:
    """The first number in a judge's reply, rounded and clamped to 1-5; None without a number."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    return min(5, max(1, round(float(match.group()))))


def parse_choice(text: str) -> str | None:
    match = _CHOICE.search(text.strip())
    return match.group(1) if match else None


def rubric_prompt(rubric: str, question: str, reference: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": (
        f"You are grading an answer.\n{rubric}\n\nQuestion: {question}\nReference answer: {reference}\n"
        f"Answer to grade: {answer}\n\nReply with a single digit from 1 to 5.")}]


def support_prompt(passage: str, question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": (
        f"Passage:\n{passage}\n\nQuestion: {question}\nAnswer: {answer}\n\nIs the answer correct for the question, "
        f"according to the passage alone? 5 = correct and stated in the passage, 3 = partly, 1 = wrong, not in the "
        f"passage, or not an answer to the question. Reply with a single digit from 1 to 5.")}]


def pairwise_prompt(question: str, reference: str, first: str, second: str) -> list[dict]:
    return [{"role": "user", "content": (
        f"Which answer responds better to the question? The reference answer is correct.\n\nQuestion: {question}\n"
        f"Reference answer: {reference}\n\nAnswer A: {first}\nAnswer B: {second}\n\nReply with A or B.")}]


def _choose(judge, conversations: list[list[dict]], options: list[str], parse, *, batch_size: int
            ) -> tuple[list[str | None], list[list[float] | None]]:
    """The judge's pick among `options` for each conversation, with the option probabilities when local."""
    if judge.has_likelihood:
        from tailor.evaluate.classification import softmax

        probabilities = [softmax(row) for row in judge.option_logprobs(conversations, options,
                                                                      batch_size=batch_size)]
        return [options[max(range(len(p)), key=p.__getitem__)] for p in probabilities], [*probabilities]
    replies = judge.answers(conversations, max_new_tokens=8, batch_size=batch_size)
    picks = []
    for reply in replies:
        parsed = parse(reply)
        picks.append(None if parsed is None else str(parsed))
    return picks, [None] * len(replies)


def rubric_scores(judge, items: list[dict], rubric: str, *, batch_size: int) -> tuple[dict, list[dict]]:
    """`items`: {question, reference, answer}; returns the summary and one row per item."""
    conversations = [rubric_prompt(rubric, it["question"], it["reference"], it["answer"]) for it in items]
    picks, probabilities = _choose(judge, conversations, SCORES, parse_score, batch_size=batch_size)
    rows, scores, expected = [], [], []
    for item, pick, probs in zip(items, picks, probabilities, strict=True):
        row: dict[str, Any] = {"question": item["question"], "score": None if pick is None else int(pick)}
        if probs is not None:
            row["expected_score"] = round(sum((i + 1) * p for i, p in enumerate(probs)), 4)
            expected.append(row["expected_score"])
        if pick is not None:
            scores.append(int(pick))
        rows.append(row)
    summary = {"mean_score": round(sum(scores) / len(scores), 4) if scores else None,
               "histogram": {s: sum(1 for x in scores if str(x) == s) for s in SCORES},
               "unparsed": len(items) - len(scores), "n": len(items)}
    if expected:
        summary["mean_expected_score"] = round(sum(expected) / len(expected), 4)
    return summary, rows


def support_scores(judge, items: list[dict], *, batch_size: int) -> list[dict]:
    """`items`: {passage, question, answer}; per item its 1-5 `score` (None when an endpoint's reply has no
    number) and, for a local judge, the `expected_score` under the option probabilities."""
    conversations = [support_prompt(it["passage"], it["question"], it["answer"]) for it in items]
    picks, probabilities = _choose(judge, conversations, SCORES, parse_score, batch_size=batch_size)
    rows = []
    for pick, probs in zip(picks, probabilities, strict=True):
        row: dict[str, Any] = {"score": None if pick is None else int(pick)}
        if probs is not None:
            row["expected_score"] = round(sum((i + 1) * p for i, p in enumerate(probs)), 4)
        rows.append(row)
    return rows


def pairwise(judge, items: list[dict], *, batch_size: int) -> tuple[dict, list[dict]]:
    """`items`: {question, reference, answer, other}: `answer` (the model's) against `other` (the reference
    model's), asked as A/B and as B/A."""
    forward = [pairwise_prompt(it["question"], it["reference"], it["answer"], it["other"]) for it in items]
    backward = [pairwise_prompt(it["question"], it["reference"], it["other"], it["answer"]) for it in items]
    picks, probabilities = _choose(judge, forward + backward, CHOICES, parse_choice, batch_size=batch_size)
    n = len(items)
    wins = ties = losses = agreed = 0
    rows = []
    # which answer each order preferred, in the model's terms: "model" or "other" (None: no pick)
    in_order_ab: dict[str | None, str] = {"A": "model", "B": "other"}
    in_order_ba: dict[str | None, str] = {"A": "other", "B": "model"}
    for i, item in enumerate(items):
        first, second = in_order_ab.get(picks[i]), in_order_ba.get(picks[n + i])
        verdict = first if first is not None and first == second else "tie"
        agreed += first is not None and first == second
        wins += verdict == "model"
        losses += verdict == "other"
        ties += verdict == "tie"
        row = {"question": item["question"], "order_ab": first, "order_ba": second, "verdict": verdict}
        ab, ba = probabilities[i], probabilities[n + i]
        if ab is not None and ba is not None:  # a local judge: both orders have them
            # P(model's answer preferred), averaged over both positions: position bias cancels in the mean
            row["p_model_better"] = round((ab[0] + ba[1]) / 2, 4)
        rows.append(row)
    summary = {"win_rate": round(wins / n, 4), "tie_rate": round(ties / n, 4), "loss_rate": round(losses / n, 4),
               "order_agreement": round(agreed / n, 4), "n": n, "judgements": 2 * n}
    preferred = [row["p_model_better"] for row in rows if "p_model_better" in row]
    if preferred:
        summary["mean_p_model_better"] = round(sum(preferred) / len(preferred), 4)
    return summary, rows
