"""Preference pairs: one canonical record `{prompt: [messages], chosen: str, rejected: str}` from the formats people
actually have, with every problem reported as `file:line`.

Accepted per line of a JSONL file (the format is recognized from the keys, so one file may mix them):
- canonical: `{"prompt": [messages] | "text", "chosen": "text", "rejected": "text"}`; TRL's conversational form,
  where chosen/rejected are one-message assistant lists, is accepted too;
- Anthropic HH: `{"chosen": "\\n\\nHuman: … \\n\\nAssistant: …", "rejected": "…"}`, two transcripts that share
  every turn but the last assistant one;
- UltraFeedback: binarized `{"prompt", "chosen": [messages], "rejected": [messages]}`, or raw
  `{"instruction", "completions": [{"response", "overall_score"}…]}` (best against worst);
- OpenAI preference fine-tuning: `{"input": {"messages": […]}, "preferred_output": [assistant message],
  "non_preferred_output": [assistant message]}`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from tailor.errors import TailorError
from tailor.workspace import read_jsonl

ROLES = ("system", "user", "assistant")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


class PreferenceError(ValueError):
    """What is wrong with one record; the loader adds the file and line."""


def _messages(value, what: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise PreferenceError(f"{what} is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise PreferenceError(f"{what} must be a text or a non-empty list of messages")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise PreferenceError(f"{what}[{index}] must be an object with \"role\" and a text \"content\"")
        if message.get("role") not in ROLES:
            raise PreferenceError(f"{what}[{index}].role must be one of {', '.join(ROLES)} "
                                  f"(found {message.get('role')!r})")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _answer(value, what: str) -> str:
    """An answer given as text, or as a list whose last message is the assistant's."""
    if isinstance(value, list):
        messages = _messages(value, what)
        if messages[-1]["role"] != "assistant":
            raise PreferenceError(f"{what} must end with an assistant message")
        return messages[-1]["content"]
    if not isinstance(value, str):
        raise PreferenceError(f"{what} must be a text or an assistant message list (found {type(value).__name__})")
    return value


def _hh_turns(transcript: str, what: str) -> list[dict]:
    """"\\n\\nHuman: a\\n\\nAssistant: b" → chat messages."""
    parts = _HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        raise PreferenceError(f"{what} is not an Anthropic HH transcript (expected \"\\n\\nHuman: …\\n\\n"
                              f"Assistant: …\")")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": text.strip()}
            for speaker, text in zip(parts[1::2], parts[2::2], strict=True)]


def _from_hh(record: dict) -> dict:
    chosen, rejected = _hh_turns(record["chosen"], "chosen"), _hh_turns(record["rejected"], "rejected")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise PreferenceError("both HH transcripts must end with an \"Assistant:\" turn")
    if chosen[:-1] != rejected[:-1]:
        raise PreferenceError("the chosen and rejected HH transcripts differ before their last assistant turn")
    return {"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def _from_ultrafeedback_raw(record: dict) -> dict:
    completions = record["completions"]
    if not isinstance(completions, list) or len(completions) < 2:
        raise PreferenceError("\"completions\" must list at least two rated responses")
    scored = []
    for index, completion in enumerate(completions):
        score = completion.get("overall_score") if isinstance(completion, dict) else None
        if isinstance(score, bool) or not isinstance(score, int | float) or not isinstance(
                completion.get("response"), str):
            raise PreferenceError(f"completions[{index}] needs a text \"response\" and a numeric \"overall_score\"")
        scored.append((score, completion["response"]))
    best, worst = max(scored, key=lambda s: s[0]), min(scored, key=lambda s: s[0])
    if best[0] == worst[0]:
        raise PreferenceError("every completion has the same overall_score: no preference to learn")
    return {"prompt": _messages(record["instruction"], "instruction"), "chosen": best[1], "rejected": worst[1]}


def _from_openai(record: dict) -> dict:
    source = record["input"]
    if not isinstance(source, dict) or "messages" not in source:
        raise PreferenceError("\"input\" must be an object with \"messages\"")
    return {"prompt": _messages(source["messages"], "input.messages"),
            "chosen": _answer(record["preferred_output"], "preferred_output"),
            "rejected": _answer(record["non_preferred_output"], "non_preferred_output")}


def _from_pair(record: dict) -> dict:
    """Canonical, TRL conversational and UltraFeedback binarized records: prompt + chosen + rejected."""
    chosen, rejected = record["chosen"], record["rejected"]
    prompt = record["prompt"]
    # UltraFeedback binarized repeats the prompt inside chosen/rejected: keep only the final answer
    if isinstance(chosen, list) and len(chosen) > 1:
        chosen_messages = _messages(chosen, "chosen")
        if isinstance(prompt, str) and chosen_messages[-2:-1] and chosen_messages[-2]["content"] == prompt:
            prompt = chosen_messages[:-1]
    return {"prompt": _messages(prompt, "prompt"), "chosen": _answer(chosen, "chosen"),
            "rejected": _answer(rejected, "rejected")}


def to_canonical(record: dict) -> dict:
    """One record in any accepted format → `{prompt, chosen, rejected}`; raises PreferenceError."""
    keys = set(record)
    if {"input", "preferred_output", "non_preferred_output"} <= keys:
        pair = _from_openai(record)
    elif {"instruction", "completions"} <= keys:
        pair = _from_ultrafeedback_raw(record)
    elif {"prompt", "chosen", "rejected"} <= keys:
        pair = _from_pair(record)
    elif {"chosen", "rejected"} <= keys and isinstance(record["chosen"], str):
        pair = _from_hh(record)
    else:
        raise PreferenceError(f"unrecognized preference record with keys {', '.join(sorted(keys)) or '(none)'}; "
                              f"expected prompt/chosen/rejected, an Anthropic HH chosen/rejected transcript pair, "
                              f"UltraFeedback instruction/completions, or OpenAI input/preferred_output/"
                              f"non_preferred_output")
    check_pair(pair)
    return pair


def check_pair(pair: dict) -> None:
    prompt = pair["prompt"]
    if prompt[-1]["role"] != "user":
        raise PreferenceError(f"the prompt must end with a user message (ends with {prompt[-1]['role']})")
    if any(not message["content"].strip() for message in prompt):
        raise PreferenceError("the prompt has an empty message")
    for side in ("chosen", "rejected"):
        if not pair[side].strip():
            raise PreferenceError(f"the {side} answer is empty")
    if pair["chosen"].strip() == pair["rejected"].strip():
        raise PreferenceError("chosen and rejected are the same answer: there is no preference to learn")


def load_preference_file(path: Path | str, *, count_tokens: Callable[[list[dict]], int] | None = None,
                         max_tokens: int | None = None) -> list[dict]:
    """Every record of a preference JSONL file in canonical form. With `count_tokens` (chat messages → tokens) and
    `max_tokens`, a prompt plus its longer answer must fit. Any problem raises TailorError naming `file:line`."""
    path = Path(path)
    pairs, problems = [], []
    for line_no, record in read_jsonl(path):
        try:
            pair = to_canonical(record)
            if count_tokens is not None and max_tokens is not None:
                longest = max((pair["chosen"], pair["rejected"]), key=len)
                tokens = count_tokens(pair["prompt"] + [{"role": "assistant", "content": longest}])
                if tokens > max_tokens:
                    raise PreferenceError(f"prompt and answer take {tokens} tokens, over the limit of {max_tokens}; "
                                          f"shorten the record or raise the limit")
        except PreferenceError as exc:
            problems.append(f"{path}:{line_no}: {exc}")
            continue
        pairs.append(pair)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s) in this file)" if len(problems) > 1 else ""
        raise TailorError(problems[0] + more)
    if not pairs:
        raise TailorError(f"{path}: no preference records")
    return pairs


def with_answer(prompt: list[dict], answer: str) -> list[dict]:
    return [*prompt, {"role": "assistant", "content": answer}]
