"""Probes shipped with tailor (`eval.probes`), package data in `evaluate/probes/`.

* bias: city-service requests written once per demographic variant ("a man" / "a woman", two names, two ages, …)
  that should not change the answer. For every counterfactual pair the report gives how far the greedy answers
  diverge (1 - token F1 between them, and whether they differ at all) and how far the model's probability of "yes"
  moves; per axis and overall.
* forgetting: 40 general-knowledge multiple-choice questions; the answer is the choice the model finds most likely.
  Customizing on a narrow domain can erase what the base model knew: the report gives every model's accuracy and
  its drop from the base model's.
"""

from __future__ import annotations

import itertools
from importlib import resources

from tailor.evaluate.classification import softmax
from tailor.evaluate.metrics import normalize_answer, token_f1

PROBES = ("bias", "forgetting")


def _read(name: str) -> list[dict]:
    import json

    text = resources.files("tailor.evaluate").joinpath("probes", f"{name}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def bias_items() -> list[dict]:
    return _read("bias")


def forgetting_items() -> list[dict]:
    return _read("forgetting")


def _pairs(item: dict) -> list[tuple[int, int]]:
    return list(itertools.combinations(range(len(item["variants"])), 2))


def run_bias(model, *, system_prompt: str, max_new_tokens: int, batch_size: int, limit: int = 0
             ) -> tuple[dict, list[dict]]:
    items = bias_items()[:limit or None]
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    prompts, owners = [], []  # one conversation per (item, variant)
    for i, item in enumerate(items):
        for variant in item["variants"]:
            text = item["template"].replace("{who}", variant)
            prompts.append([*system, {"role": "user", "content": text[0].upper() + text[1:]}])
            owners.append(i)
    answers = model.answers(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    yes: list[float | None] = [None] * len(prompts)
    if model.has_likelihood:
        # every item's options are ["yes", "no"]: the probability of the first is the item's score
        yes = [softmax(row)[0] for row in model.option_logprobs(prompts, items[0]["options"],
                                                                 batch_size=batch_size)]
    rows, start = [], 0
    for item in items:
        for a, b in _pairs(item):
            answer_a, answer_b = answers[start + a], answers[start + b]
            row = {"model": model.name, "axis": item["axis"], "variants": [item["variants"][a], item["variants"][b]],
                   "answers": [answer_a, answer_b],
                   "output_divergence": round(1 - token_f1(answer_a, answer_b), 4),
                   "changed": normalize_answer(answer_a) != normalize_answer(answer_b)}
            yes_a, yes_b = yes[start + a], yes[start + b]
            if yes_a is not None and yes_b is not None:  # a model with likelihoods: all are set
                row["p_yes"] = [round(yes_a, 4), round(yes_b, 4)]
                row["score_gap"] = round(abs(yes_a - yes_b), 4)
            rows.append(row)
        start += len(item["variants"])
    return _bias_summary(rows), rows


def _bias_summary(rows: list[dict]) -> dict:
    def mean(values):
        values = list(values)
        return round(sum(values) / len(values), 4) if values else None

    summary = {"pairs": len(rows), "output_divergence": mean(r["output_divergence"] for r in rows),
               "changed_rate": mean(float(r["changed"]) for r in rows),
               "score_gap": mean(r["score_gap"] for r in rows if "score_gap" in r),
               "max_score_gap": max((r["score_gap"] for r in rows if "score_gap" in r), default=None),
               "by_axis": {}}
    for axis in sorted({r["axis"] for r in rows}):
        of_axis = [r for r in rows if r["axis"] == axis]
        summary["by_axis"][axis] = {"pairs": len(of_axis),
                                    "output_divergence": mean(r["output_divergence"] for r in of_axis),
                                    "score_gap": mean(r["score_gap"] for r in of_axis if "score_gap" in r)}
    return summary


def run_forgetting(model, *, batch_size: int, limit: int = 0) -> tuple[dict, list[dict]]:
    """Accuracy on the general-knowledge quiz (`limit`: the first N questions); needs token likelihoods."""
    items = forgetting_items()[:limit or None]
    prompts = [[{"role": "user", "content": f"{item['question']} Answer with one of: {', '.join(item['choices'])}."}]
               for item in items]
    scores = model.option_logprobs(prompts, [item["choices"] for item in items], batch_size=batch_size)
    rows, correct = [], 0
    for item, logprobs in zip(items, scores, strict=True):
        chosen = item["choices"][max(range(len(logprobs)), key=logprobs.__getitem__)]
        correct += chosen == item["answer"]
        rows.append({"model": model.name, "question": item["question"], "answer": item["answer"],
                     "chosen": chosen, "correct": chosen == item["answer"]})
    return {"accuracy": round(correct / len(items), 4), "correct": correct, "n": len(items)}, rows


def add_forgetting_drop(probes: dict) -> None:
    """`drop` = base accuracy - model accuracy, for every model beside `base` (positive: knowledge lost)."""
    base = probes.get("base", {}).get("forgetting")
    if base is None:
        return
    for name, results in probes.items():
        if name != "base" and "forgetting" in results:
            results["forgetting"]["drop"] = round(base["accuracy"] - results["forgetting"]["accuracy"], 4)
