"""The reward model learns a synthetic preference on the tiny model, saves, reloads and scores."""

import json

import pytest
from typer.testing import CliRunner

from tailor.cli.app import app
from tailor.config import validate_config
from tailor.errors import TailorError
from tailor.methods.reward import load_reward_model, reward_folder, score
from tailor.train.run import run_training
from tailor.workspace import write_jsonl

TOPICS = ["library", "parking", "pool", "permits", "taxes", "trash", "parks", "water", "snow", "dogs", "voting",
          "housing", "transit", "trees", "noise", "fire", "police", "jobs", "seniors", "gardens"]


def synthetic_pairs():
    # chosen answers are polite and name a department; rejected ones are curt: a rule the head can learn
    return [{"prompt": [{"role": "user", "content": f"Who handles {topic}?"}],
             "chosen": f"Please contact the {topic.title()} Department, thank you.",
             "rejected": f"{topic}. figure it out"} for topic in TOPICS]


def config(model_dir, **train):
    return validate_config({"base_model": model_dir, "train": {
        "method": "reward", "max_steps": 30, "batch_size": 8, "learning_rate": 3e-3, "scheduler": "constant",
        "warmup_ratio": 0.0, "dtype": "fp32"} | train,
        "methods": {"reward": {"r": 4, "alpha": 8, "eval_fraction": 0.25}}})


def test_pair_accuracy_rises_above_chance_and_the_model_reloads(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "data" / "preferences.jsonl", synthetic_pairs())
    result = run_training(config(tiny_model_dir), tmp_path, tmp_path, show_progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == result.steps == 30
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.2  # starts at log 2 (zero head), falls
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["stages"]["train"]["method"] == "reward"
    assert manifest["metrics"]["train.pair_accuracy"] >= 0.8  # 5 held-out pairs; chance is 0.5

    model, tokenizer = load_reward_model(reward_folder(tmp_path))
    held_out = synthetic_pairs()[:3]
    chosen = score(model, tokenizer, [p["prompt"] + [{"role": "assistant", "content": p["chosen"]}] for p in held_out])
    rejected = score(model, tokenizer, [p["prompt"] + [{"role": "assistant", "content": p["rejected"]}]
                                        for p in held_out])
    assert all(c > r for c, r in zip(chosen, rejected, strict=True))

    # `tailor reward score FILE`: the same scores, written beside each record
    answers = tmp_path / "answers.jsonl"
    write_jsonl(answers, [{"prompt": p["prompt"][0]["content"], "answer": p["chosen"]} for p in held_out])
    result = CliRunner().invoke(app, ["reward", "score", str(answers), "--reward", str(tmp_path), "-o",
                                      str(tmp_path / "scored.jsonl")])
    assert result.exit_code == 0, result.output
    scored = [json.loads(line)["reward"] for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert scored == pytest.approx(chosen, abs=1e-4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n')
    result = CliRunner().invoke(app, ["reward", "score", str(bad), "--reward", str(tmp_path)])
    assert result.exit_code != 0 and "bad.jsonl:1: expected \"prompt\"" in str(result.exception)


def test_missing_preference_file_stops_before_loading(tiny_model_dir, tmp_path):
    with pytest.raises(TailorError, match=r"methods\.reward\.preference_file: preference file .*preferences\.jsonl "
                                          r"not found"):
        run_training(config(tiny_model_dir), tmp_path, tmp_path, show_progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()
