"""Build: the collected feedback as training and comparison data, every row carrying the feedback id it came from.

    CYCLE/data/train.jsonl        SFT chat records: each correction as the answer to its conversation, plus
                                  improve.replay records of the production run's training data per correction
    CYCLE/data/unpaired.jsonl     KTO: each rated answer, desirable when up-voted
    CYCLE/data/preferences.jsonl  DPO: correction over the answer it corrects; up-voted over down-voted answers to the
                                  same conversation
    CYCLE/eval/data/eval.jsonl    the comparison: corrected questions (reference: the correction), the production
                                  run's held-out questions, and the regression set (reference: the up-voted answer);
                                  each record's `source` says which
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tailor.config import TailorConfig
from tailor.feedback.export import to_pairs
from tailor.workspace import read_jsonl, write_jsonl

SETS = ("corrected", "heldout", "regression")


def with_system(prompt: list[dict], system_prompt: str) -> list[dict]:
    """The conversation as the server answered it: the engine puts the workspace's system prompt first when the
    client sent none, so training and eval records carry it too."""
    return prompt if prompt and prompt[0].get("role") == "system" else [{"role": "system", "content": system_prompt},
                                                                        *prompt]


def build(config: TailorConfig, collected: dict, production_run: Path, cycle_dir: Path) -> dict:
    system = config.system_prompt
    corrections = collected["corrections"]
    sft = [{"messages": [*with_system(c["prompt"], system), {"role": "assistant", "content": c["correction"]}],
            "feedback_id": c["feedback_id"]} for c in corrections]
    replay_pool = [record for _, record in read_jsonl(production_run / "data" / "train.jsonl")] \
        if (production_run / "data" / "train.jsonl").is_file() else []
    rng = random.Random(config.train.seed)
    replay = rng.sample(replay_pool, min(len(replay_pool), config.improve.replay * len(sft)))
    data_dir = cycle_dir / "data"
    written = {"sft": write_jsonl(data_dir / "train.jsonl", sft + [{**r, "replay": True} for r in replay])}

    rated = collected["rated"]
    written["kto"] = write_jsonl(data_dir / "unpaired.jsonl", [
        {"prompt": with_system(r["prompt"], system), "completion": r["answer"], "label": r["rating"] == "up",
         "feedback_id": r["feedback_id"]} for r in rated if r["answer"].strip()])
    pairs = [{"prompt": with_system(c["prompt"], system), "chosen": c["correction"], "rejected": c["answer"],
              "feedback_ids": [c["feedback_id"]]} for c in corrections if c["correction"] != c["answer"].strip()]
    by_answer: dict[tuple[str, str], int] = {}  # (prompt as JSON, answer) -> its first feedback id
    for r in rated:
        by_answer.setdefault((json.dumps(r["prompt"], sort_keys=True), r["answer"]), r["feedback_id"])
    for pair in to_pairs([{**r, "model": "-"} for r in rated]):
        key = json.dumps(pair["prompt"], sort_keys=True)
        pairs.append({"prompt": with_system(pair["prompt"], system), "chosen": pair["chosen"],
                      "rejected": pair["rejected"],
                      "feedback_ids": [by_answer[(key, pair["chosen"])], by_answer[(key, pair["rejected"])]]})
    written["dpo"] = write_jsonl(data_dir / "preferences.jsonl", pairs)

    comparison = [{"messages": [*with_system(c["prompt"], system), {"role": "assistant", "content": c["correction"]}],
                   "source": f"corrected:feedback {c['feedback_id']}"} for c in corrections]
    heldout_path = production_run / "data" / "eval.jsonl"
    heldout = [(line, record) for line, record in read_jsonl(heldout_path)] if heldout_path.is_file() else []
    # a held-out question somebody corrected is measured once, as corrected: "the rest" must not hold it
    corrected = {_question(c["prompt"]) for c in corrections}
    heldout = [(line, record) for line, record in heldout if _question(record["messages"]) not in corrected]
    if config.improve.eval_limit:
        heldout = heldout[:config.improve.eval_limit]
    comparison += [{"messages": record["messages"], "source": f"heldout:{heldout_path.name}:{line}"}
                   for line, record in heldout]
    comparison += [{"messages": [*with_system(r["prompt"], system), {"role": "assistant", "content": r["answer"]}],
                    "source": f"regression:feedback {r['feedback_id']}"} for r in collected["regression"]]
    written["comparison"] = write_jsonl(cycle_dir / "eval" / "data" / "eval.jsonl", comparison)
    written["heldout"], written["regression"] = len(heldout), len(collected["regression"])
    return {"counts": written, "replayed": len(replay),
            "feedback_ids": {"sft": [c["feedback_id"] for c in corrections],
                             "kto": [r["feedback_id"] for r in rated],
                             "dpo": sorted({i for p in pairs for i in p["feedback_ids"]}),
                             "regression": [r["feedback_id"] for r in collected["regression"]]}}


def _question(messages: list[dict]) -> str:
    return " ".join(next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "").lower().split())
