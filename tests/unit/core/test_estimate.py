"""`tailor estimate` on the tiny model: token counts from the real tokenizer, the 6·N / 4·N FLOP rules, memory per
method that orders full > LoRA > QLoRA, hardware profiles, and the comparison with a past run in the registry."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from tailor.config import validate_config
from tailor.errors import TailorError
from tailor.estimate import activation_bytes, dataset_stats, estimate, model_shape, probe_matmul_tflops, training_flops
from tailor.models.base import load_tokenizer
from tailor.registry import Registry
from tailor.train.examples import chat_ids
from tailor.train.run import run_training
from tailor.workspace import write_jsonl
from tests.unit.helpers import tailor

FACTS = [("When is the library open?", "Monday to Friday, 9 am to 7 pm."),
         ("How much is a parking permit?", "A parking permit costs $45 per year.")]
RECORDS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS * 4]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "run" / "data" / "train.jsonl"
    write_jsonl(path, RECORDS)
    return path


def config_for(model_dir, **train):
    return validate_config({"base_model": model_dir, "methods": {"lora": {"r": 4, "alpha": 8}},
                            "train": {"max_steps": 0, "epochs": 2, "batch_size": 4, "dtype": "fp32"} | train})


def test_counts_flops_and_memory(tiny_model_dir, data_file, tmp_path):
    config = config_for(tiny_model_dir)
    result = estimate(config, tmp_path, data_file, probe_seconds=0.05)
    tokenizer = load_tokenizer(tiny_model_dir)
    per_epoch = sum(len(chat_ids(tokenizer, r["messages"])) for r in RECORDS)
    assert result.data.records == 8 and result.data.tokens == per_epoch
    assert (result.steps, result.epochs, result.tokens) == (4, 2.0, 2 * per_epoch)

    shape = model_shape(tiny_model_dir)
    real = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert result.params == shape.params == sum(p.numel() for p in real.parameters())
    # LoRA r=4 on q,k,v,o (64→64, 64→32 for k/v with 2 kv heads) and gate/up/down (64↔128), 2 layers
    expected_lora = 2 * 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    assert result.trainable == expected_lora
    assert result.frozen_base and result.flops == 4 * shape.params * result.tokens + 6 * expected_lora * result.tokens
    assert training_flops(shape.params, shape.params, 100, frozen_base=False) == 6 * shape.params * 100

    memory = {m.method: m for m in result.memory}
    assert memory["full"].total_gib > memory["lora"].total_gib > memory["qlora"].total_gib
    assert memory["full"].optimizer_gib == pytest.approx(8 * shape.params / 1024**3)
    assert memory["lora"].activations_gib == pytest.approx(activation_bytes(shape, 4, result.data.max_tokens)
                                                            / 1024**3)
    names = [h.hardware for h in result.hardware]
    assert names[0].startswith("this machine") and {"A10G 24GB", "A100 40GB", "A100 80GB", "H100 80GB"} <= set(names)
    h100, a10g = result.hardware[names.index("H100 80GB")], result.hardware[names.index("A10G 24GB")]
    assert 0 < h100.hours < a10g.hours and h100.dollars > 0 and h100.fits_memory is True
    assert any("4·N" in line for line in result.assumptions)


def test_full_uses_six_n(tiny_model_dir, data_file, tmp_path):
    result = estimate(config_for(tiny_model_dir, method="full"), tmp_path, data_file, probe_seconds=0.05)
    assert not result.frozen_base and result.trainable == result.params
    assert result.flops == 6 * result.params * result.tokens


def test_probe_measures_a_positive_rate():
    assert 0 < probe_matmul_tflops(torch.float32, size=256, seconds=0.05) < 1000


def test_bad_data_names_the_line(tiny_model_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"messages": []}) + "\n")
    with pytest.raises(TailorError, match=f"{path}:2: expected a non-empty"):
        dataset_stats(path, load_tokenizer(tiny_model_dir))
    with pytest.raises(TailorError, match="tailor data build"):
        dataset_stats(tmp_path / "missing.jsonl", None)


def test_compares_with_past_runs_and_cli_json(tiny_model_dir, data_file, tmp_path):
    torch.set_num_threads(1)
    run = data_file.parent.parent
    config = config_for(tiny_model_dir, max_steps=2, save_every=0)
    run_training(config, run, run, show_progress=False)
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    version = registry.register_run(run, "city")
    result = estimate(config, tmp_path, data_file, registry=registry, probe_seconds=0.05)
    [past] = result.past_runs
    assert past.label == "city@1" and past.tokens == version.metrics["train"]["tokens"]
    assert past.measured_seconds == version.metrics["train"]["seconds"] and past.estimated_seconds > 0
    assert any("calibrated on 1 past run" in line for line in result.assumptions)

    (tmp_path / "tailor.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    out = tmp_path / "estimate.json"
    done = tailor("estimate", "-w", tmp_path, "--json", out, columns=250)
    assert done.returncode == 0, done.stderr
    assert "Memory needed to train" in done.stdout and "H100 80GB" in done.stdout and "city@1" in done.stdout
    saved = json.loads(out.read_text())
    assert saved["tokens"] == result.tokens and {m["method"] for m in saved["memory"]} == {"full", "lora", "qlora"}
