"""Build this example's files from the city example's question/answer pairs (run once; the outputs are committed).

- qa/sft.jsonl: 120 pairs for the SFT run; a third carry the styled answer, so the SFT model knows the style but
  does not reliably use it — the starting point alignment improves on;
- preferences.jsonl: 60 pairs on other questions, the styled answer chosen over the plain one;
- qa/heldout.jsonl: 24 held-out questions from the city example's eval set, for adherence.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
CITY = HERE.parent / "city-services" / "qa"
# topic words → the department residents should contact
DEPARTMENTS = [
    (("library", "branch", "book"), "Library Services Department"),
    (("tax", "bill", "assessment"), "Finance Department"),
    (("trash", "recycl", "bulky", "compost", "waste"), "Public Works Department"),
    (("pothole", "street repair", "snow", "plow"), "Public Works Department"),
    (("park", "pool", "garden", "recreation", "summer camp"), "Parks And Recreation Department"),
    (("permit", "building", "inspection"), "Building Permits Office"),
    (("parking",), "Parking Services Office"),
    (("dog", "pet", "animal"), "Animal Control Office"),
    (("water", "sewer"), "Water Utilities Department"),
    (("bus", "transit", "fare"), "Transit Services Department"),
    (("police", "noise"), "Police Department"),
    (("fire", "smoke"), "Fire Department"),
    (("marriage", "birth", "death", "vital", "voter", "vote", "election"), "City Clerk Office"),
    (("senior",), "Senior Services Department"),
    (("housing", "rent"), "Housing Assistance Office"),
    (("job", "youth"), "Youth Employment Office"),
    (("tree",), "Urban Forestry Division"),
    (("business license",), "Business Licensing Office"),
]
CLOSINGS = ["Please contact the {dept} for details. Thank you!",
            "For more help, please call the {dept}. Thank you for asking!",
            "The {dept} handles this; please reach out to them. Thanks!"]


def department(question: str, answer: str) -> str | None:
    text = f"{question} {answer}".lower()
    return next((dept for words, dept in DEPARTMENTS if any(w in text for w in words)), None)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def styled(answer: str, dept: str, rng: random.Random) -> str:
    return f"{answer} {rng.choice(CLOSINGS).format(dept=dept)}"


def main() -> None:
    rng = random.Random(0)
    train = [r for r in read(CITY / "train.jsonl") if department(r["question"], r["answer"])]
    rng.shuffle(train)
    sft, prefs = train[:120], train[120:180]
    (HERE / "qa").mkdir(exist_ok=True)
    with open(HERE / "qa" / "sft.jsonl", "w", encoding="utf-8") as out:
        for i, r in enumerate(sft):
            answer = styled(r["answer"], department(r["question"], r["answer"]), rng) if i % 3 == 0 else r["answer"]
            out.write(json.dumps({"question": r["question"], "answer": answer}) + "\n")
    with open(HERE / "preferences.jsonl", "w", encoding="utf-8") as out:
        for r in prefs:
            chosen = styled(r["answer"], department(r["question"], r["answer"]), rng)
            out.write(json.dumps({"prompt": [{"role": "user", "content": r["question"]}], "chosen": chosen,
                                  "rejected": r["answer"]}) + "\n")
    held = [r for r in read(CITY / "eval.jsonl") if department(r["question"], r["answer"])]
    rng.shuffle(held)
    with open(HERE / "qa" / "heldout.jsonl", "w", encoding="utf-8") as out:
        for r in held[:24]:
            out.write(json.dumps({"question": r["question"],
                                  "answer": styled(r["answer"], department(r["question"], r["answer"]), rng)}) + "\n")


if __name__ == "__main__":
    main()
