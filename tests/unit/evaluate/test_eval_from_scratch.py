"""`tailor eval` on a from_scratch run: the model trained with its own tokenizer (another vocabulary than the base's)
is read with that tokenizer, side by side with the base read with the base's."""

import json
import math

import yaml

from tailor.cli.stages import evaluate
from tailor.config import validate_config
from tailor.models.base import load_tokenizer
from tailor.train.run import run_training
from tailor.workspace import write_jsonl
from tests.unit.helpers import FACTS, chat

CORPUS = ["The Maplewood public library opens Monday to Friday from 9 am to 7 pm and on Saturdays from 10 am to 4 pm.",
          "Residential parking permits cost $45 per year. Apply online or at City Hall, Room 104.",
          "City Hall is at 200 Main Street and is open weekdays from 8 am to 5 pm. Call (555) 201-4400."]


def test_tailor_eval_reads_a_from_scratch_model_with_its_own_tokenizer(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    write_jsonl(run_dir / "data" / "train.jsonl", [chat(*FACTS[i % 3]) for i in range(6)])
    write_jsonl(run_dir / "data" / "eval.jsonl", [chat(*fact) for fact in FACTS])
    write_jsonl(run_dir / "corpus.jsonl", [{"id": f"doc-{i}", "text": text} for i, text in enumerate(CORPUS)])
    settings = {"base_model": tiny_model_dir,
                "train": {"method": "from_scratch", "max_steps": 2, "batch_size": 3, "dtype": "fp32",
                          "learning_rate": 3e-3, "save_every": 0},
                "methods": {"from_scratch": {"size": "tiny", "vocab_size": 512, "block_tokens": 32,
                                             "overlap_tokens": 8, "corpus_steps": 2}}}
    run_training(validate_config(settings), tmp_path, run_dir, show_progress=False)
    own = load_tokenizer(str(run_dir / "model"))
    assert own.get_vocab() != load_tokenizer(tiny_model_dir).get_vocab()  # the case that used to be refused

    # the command a user runs after `tailor train --method from_scratch`; tailor.yaml may name another method
    settings["train"]["method"] = "lora"
    settings["eval"] = {"max_new_tokens": 4, "batch_size": 2}
    (tmp_path / "tailor.yaml").write_text(yaml.safe_dump(settings))
    evaluate(overrides=[], workspace=tmp_path, run=run_dir, no_progress=True, fail_under=[])

    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert list(report["models"]) == ["base", "from_scratch"] and report["method"] == "from_scratch"
    for metrics in report["models"].values():
        assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
        assert 0 <= metrics["token_f1"] <= 1 and metrics["n"] == 3
    # a random 512-token model is far from the base: a loss read with the wrong ids would not tell them apart
    assert report["models"]["from_scratch"]["eval_loss"] != report["models"]["base"]["eval_loss"]
    # its vocabulary bounds the loss: near log(512) for a model two steps from random, not log(base vocabulary)
    assert report["models"]["from_scratch"]["eval_loss"] < math.log(len(own)) + 1.5
    rows = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert sum(row["model"] == "from_scratch" for row in rows) == 3
    assert all(isinstance(row["prediction"], str) for row in rows)
