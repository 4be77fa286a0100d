"""The style guide as code: an answer names the responsible department, stays under 60 words and is polite.

`style_reward` is PPO's rule-based reward (`methods.ppo.reward_function: rewards:style_reward`); `follows_style` is
the adherence check the example's measurement uses. The same three checks are `eval.rules` in tailor.yaml.
"""

from __future__ import annotations

import re

# a named unit: "the fire department" and "the Parks And Recreation Department" name one, "the department" does not
DEPARTMENT = re.compile(r"\b(?!(?:the|a|an|this|that|your|our|their|city)\b)[a-z]+ "
                        r"(?:department|office|services|division)\b", re.IGNORECASE)
POLITE = re.compile(r"\b(?:please|thank you|thanks|happy to help|glad to help)\b", re.IGNORECASE)
MAX_WORDS = 60


def checks(answer: str) -> dict[str, bool]:
    return {"names_department": DEPARTMENT.search(answer) is not None,
            "under_60_words": len(answer.split()) < MAX_WORDS,
            "polite": POLITE.search(answer) is not None}


def style_reward(prompt: list[dict], answer: str) -> float:
    """Share of the three checks the answer passes (0 to 1); an empty answer earns nothing."""
    if not answer.strip():
        return 0.0
    return sum(checks(answer).values()) / 3


def follows_style(answer: str) -> bool:
    return all(checks(answer).values())
