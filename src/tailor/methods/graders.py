"""Graders: what scores a sampled answer for reinforcement fine-tuning (GRPO; PPO's reward function), in the style
of OpenAI's reinforcement fine-tuning graders: a string check, text similarity to a reference answer, a Python
function, a trained reward model's score, and weighted combinations of them.

Not a method itself: listed in the registry's HELPER_MODULES.
"""

from __future__ import annotations

import difflib
import importlib
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tailor.errors import TailorError

RewardFunction = Callable[[list[dict], str], float]


def load_reward_function(spec: str, root: Path, key: str) -> RewardFunction:
    """`module:function`, the module found in the workspace folder (e.g. rewards:style_reward for rewards.py)."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise TailorError(f"{key}: expected module:function (found {spec!r})")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # the workspace's own modules, like the example's rewards.py
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 — any failure importing user code is the user's to fix
        raise TailorError(f"{key}: cannot import {module_name!r} from {root} ({type(exc).__name__}: {exc})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise TailorError(f"{key}: {module_name} has no function {function_name!r}")
    return function


def call_reward_function(function: RewardFunction, spec: str, key: str, prompt: list[dict], answer: str) -> float:
    """The function's score, or one message naming the prompt when it raises or returns no finite number."""
    question = prompt[-1]["content"]
    try:
        value = function(prompt, answer)
    except Exception as exc:  # noqa: BLE001 — user code: stop with the prompt that broke it
        raise TailorError(f"{key}: {spec} raised {type(exc).__name__}: {exc} on the prompt {question!r} "
                          f"(answer {answer!r})") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TailorError(f"{key}: {spec} returned {value!r}, not a finite number, on the prompt {question!r} "
                          f"(answer {answer!r})")
    return float(value)


class _Grader(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, description="Shown in the metrics; default: the grader's type and position.")
    weight: float = Field(1.0, ge=0, description="Weight in the combined score (scores are averaged by weight).")


class StringCheck(_Grader):
    type: Literal["string_check"] = Field(description="Compare the answer with a text.")
    operation: Literal["eq", "ne", "like", "ilike"] = Field("eq", description=(
        "eq / ne: the answer (stripped) equals / differs from the reference; like / ilike: contains it, case-"
        "sensitive / not."))
    reference: str | None = Field(None, description="The text to check against; null: the prompt's reference answer.")


class TextSimilarity(_Grader):
    type: Literal["text_similarity"] = Field(description="Score the answer's similarity to the reference answer.")
    metric: Literal["token_f1", "rouge_l", "bleu", "fuzzy_match"] = Field("token_f1", description=(
        "Similarity to the prompt's reference answer, 0 to 1: SQuAD token F1, ROUGE-L, sentence BLEU (sacrebleu) "
        "or difflib's character ratio."))


class PythonGrader(_Grader):
    type: Literal["python"] = Field(description="Score the answer with a Python function.")
    function: str = Field(description="A callable module:function(prompt_messages, answer) -> float in the "
                                      "workspace folder.")


class ScoreModel(_Grader):
    type: Literal["score_model"] = Field(description="Score the answer with a trained reward model.")
    model: str = Field(description="A reward run folder (`tailor train --method reward`).")


GraderSpec = Annotated[StringCheck | TextSimilarity | PythonGrader | ScoreModel, Field(discriminator="type")]


def _similarity(metric: str) -> Callable[[str, str], float]:
    from tailor.evaluate import metrics

    return {"token_f1": metrics.token_f1, "rouge_l": metrics.rouge_l,
            "bleu": lambda a, b: metrics.sentence_bleu(a, b) / 100,
            "fuzzy_match": lambda a, b: difflib.SequenceMatcher(None, a, b).ratio()}[metric]


class Graders:
    """Scores (prompt, answer, reference) triples with every grader; `__call__` returns the weighted mean and each
    grader's scores by name (for the metrics)."""

    def __init__(self, specs: list, root: Path, key: str):
        if not specs:
            raise TailorError(f"{key}: name at least one grader")
        self.key, self.specs = key, specs
        self.names = [spec.name or f"{spec.type}_{i + 1}" for i, spec in enumerate(specs)]
        self._score: list[Callable[[list[list[dict]], list[str], list[str | None]], list[float]]] = []
        for i, spec in enumerate(specs):
            where = f"{key}[{i}]"
            if isinstance(spec, PythonGrader):
                self._score.append(self._python(spec, root, where))
            elif isinstance(spec, ScoreModel):
                self._score.append(self._model(spec, root, where))
            else:
                self._score.append(self._text(spec, where))
        total = sum(spec.weight for spec in specs)
        if total <= 0:
            raise TailorError(f"{key}: the graders' weights sum to 0")
        self.weights = [spec.weight / total for spec in specs]

    @staticmethod
    def _python(spec: PythonGrader, root: Path, where: str):
        function = load_reward_function(spec.function, root, f"{where}.function")
        return lambda prompts, answers, references: [
            call_reward_function(function, spec.function, f"{where}.function", p, a)
            for p, a in zip(prompts, answers, strict=True)]

    @staticmethod
    def _model(spec: ScoreModel, root: Path, where: str):
        from tailor.methods.reward import load_reward_model, reward_folder, score

        model, tokenizer = load_reward_model(reward_folder(spec.model, root, f"{where}.model"))
        return lambda prompts, answers, references: score(
            model, tokenizer,
            [p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, answers, strict=True)])

    @staticmethod
    def _text(spec: StringCheck | TextSimilarity, where: str):
        def grade(prompts, answers, references):
            scores = []
            for prompt, answer, reference in zip(prompts, answers, references, strict=True):
                target = spec.reference if isinstance(spec, StringCheck) and spec.reference is not None else reference
                if target is None:
                    raise TailorError(f"{where}: the prompt {prompt[-1]['content']!r} has no reference answer (end "
                                      f"its messages with an assistant turn, or give the grader a reference)")
                if isinstance(spec, TextSimilarity):
                    scores.append(_similarity(spec.metric)(answer, target))
                elif spec.operation in ("eq", "ne"):
                    scores.append(float((answer.strip() == target.strip()) == (spec.operation == "eq")))
                elif spec.operation == "like":
                    scores.append(float(target in answer))
                else:
                    scores.append(float(target.lower() in answer.lower()))
            return scores
        return grade

    def __call__(self, prompts: list[list[dict]], answers: list[str], references: list[str | None]
                 ) -> tuple[list[float], dict[str, list[float]]]:
        each = {name: score(prompts, answers, references) for name, score in zip(self.names, self._score, strict=True)}
        combined = [sum(w * each[name][i] for name, w in zip(self.names, self.weights, strict=True))
                    for i in range(len(answers))]
        return combined, each
