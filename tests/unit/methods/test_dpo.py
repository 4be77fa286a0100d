"""DPO on the training core with the tiny model: the loss falls, the artifact is a plain LoRA adapter on the base,
an SFT adapter can be the starting point (and reference), and each loss variant matches its formula."""

import json

import peft
import torch
from transformers import AutoModelForCausalLM

from tailor.config import validate_config
from tailor.methods.artifacts import load_for_inference
from tailor.train.run import run_training
from tailor.workspace import write_jsonl

PAIRS = [{"prompt": [{"role": "user", "content": f"Question {i}?"}], "chosen": "Please ask the Clerk Department.",
          "rejected": "No."} for i in range(4)]


def config(model_dir, steps=4, **dpo):
    return validate_config({"base_model": model_dir, "train": {
        "method": "dpo", "max_steps": steps, "batch_size": 2, "learning_rate": 1e-2, "scheduler": "constant",
        "warmup_ratio": 0.0, "dtype": "fp32"}, "methods": {"dpo": {"r": 4, "alpha": 8, "beta": 0.5} | dpo}})


def test_dpo_loss_falls_and_saves_a_plain_adapter(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "data" / "preferences.jsonl", PAIRS)
    result = run_training(config(tiny_model_dir), tmp_path, tmp_path, show_progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 4 and len(lines) == 4
    assert abs(lines[0]["loss"] - 0.6931) < 0.01  # policy == reference at the start: -log σ(0)
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.1
    assert lines[-1]["margin"] > 0 and lines[-1]["chosen_reward"] > lines[-1]["rejected_reward"]
    assert lines[-1]["tokens_per_s"] > 0
    assert json.loads((tmp_path / "manifest.json").read_text())["stages"]["train"]["method"] == "dpo"

    # eval loads it like any LoRA run; the chosen answer became likelier than the rejected one
    loaded = load_for_inference(config(tiny_model_dir), tmp_path, tiny_model_dir, torch.float32)
    assert loaded.names == ["base", "dpo"]
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and not (tmp_path / "adapter" / "ref").exists()

    # a second DPO run starting from that adapter: the reference is that adapter, so the loss starts at log 2
    other = tmp_path / "second"
    write_jsonl(other / "data" / "preferences.jsonl", PAIRS)
    run_training(config(tiny_model_dir, steps=1, init_adapter=str(tmp_path)), other, other, show_progress=False)
    first = json.loads((other / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - 0.6931) < 0.01
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    start = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    start_weights = {n: p.clone() for n, p in start.named_parameters() if "lora_" in n}
    continued = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                               str(other / "adapter"))
    moved = [n for n, p in continued.named_parameters() if "lora_" in n and not torch.equal(p, start_weights[n])]
    assert moved


def test_full_weight_dpo_is_found_by_eval_and_export(tiny_model_dir, tmp_path):
    """`adapter: full` saves a whole model in RUN/model/: eval, serve and export read the kind from the run's
    options."""
    from tailor.evaluate.sources import run_has_artifact
    from tailor.methods.artifacts import run_method
    from tailor.models.export import read_trained_run

    write_jsonl(tmp_path / "data" / "preferences.jsonl", PAIRS)
    full = config(tiny_model_dir, steps=1, adapter="full")
    run_training(full, tmp_path, tmp_path, show_progress=False)
    assert (tmp_path / "model" / "config.json").is_file() and not (tmp_path / "adapter").exists()
    assert run_method(full, tmp_path).artifact == "model" and run_has_artifact(full, tmp_path)
    loaded = load_for_inference(full, tmp_path, tiny_model_dir, torch.float32)
    assert loaded.names == ["base", "dpo"] and loaded.has_artifact
    assert read_trained_run(tmp_path).artifact == tmp_path / "model"
