import json

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from tailor.config import validate_config
from tailor.methods.kinds import ADAPTER
from tailor.models.base import load_tokenizer
from tailor.train.examples import IGNORE, tokenize_chat
from tailor.train.run import run_training
from tailor.workspace import write_jsonl
from tests.unit.helpers import FACTS, chat


@pytest.fixture
def run_dir(tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", [chat(*FACTS[i % 3]) for i in range(24)])
    write_jsonl(tmp_path / "data" / "eval.jsonl", [chat(*fact) for fact in FACTS])
    return tmp_path


def config_for(model_dir, **train):
    options = {"max_steps": 6, "batch_size": 4, "learning_rate": 5e-3, "save_every": 3, "dtype": "fp32",
               "warmup_ratio": 0.0} | train
    return validate_config({"base_model": model_dir, "train": options, "methods": {"lora": {"r": 4, "alpha": 8}}})


def adapter_weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / ADAPTER.folder / "adapter_model.safetensors")


def test_loss_mask_covers_only_the_answer(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    example = tokenize_chat(tokenizer, chat("Q?", "The answer.")["messages"])
    learned = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True)
                                if label != IGNORE])
    assert learned.startswith("The answer.")
    assert "Q?" not in learned and "Be brief" not in learned


def test_training_lowers_loss_and_writes_a_peft_adapter(tiny_model_dir, run_dir):
    result = run_training(config_for(tiny_model_dir, max_steps=10), run_dir, run_dir, show_progress=False)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 11))
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in lines)
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert all(line["tokens_per_s"] > 0 for line in lines)
    assert result.eval_loss is not None and result.trainable_params > 0
    # plain peft loads the adapter
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = peft.PeftModel.from_pretrained(base, str(run_dir / ADAPTER.folder))
    assert any("lora_A" in name for name, _ in model.named_parameters())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "train" in manifest["stages"] and "torch" in manifest["packages"]
    assert manifest["stages"]["train"]["inputs"]  # input files are hashed


def test_same_seed_same_weights(tiny_model_dir, run_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("again")
    write_jsonl(other / "data" / "train.jsonl", [json.loads(x) for x in (run_dir / "data" / "train.jsonl").open()])
    run_training(config_for(tiny_model_dir), run_dir, run_dir, show_progress=False)
    run_training(config_for(tiny_model_dir), other, other, show_progress=False)
    first, second = adapter_weights(run_dir), adapter_weights(other)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_resume_ends_with_the_same_weights(tiny_model_dir, run_dir, tmp_path_factory):
    config = config_for(tiny_model_dir, max_steps=6, save_every=3)
    straight = tmp_path_factory.mktemp("straight")
    write_jsonl(straight / "data" / "train.jsonl", [json.loads(x) for x in (run_dir / "data" / "train.jsonl").open()])
    run_training(config, straight, straight, show_progress=False)

    interrupted = run_training(config, run_dir, run_dir, show_progress=False, should_stop=lambda step: step == 4)
    assert interrupted.steps == 4 and not (run_dir / ADAPTER.folder).exists()
    resumed = run_training(config, run_dir, run_dir, resume=True, show_progress=False)
    assert resumed.steps == 6
    first, second = adapter_weights(straight), adapter_weights(run_dir)
    assert all(torch.allclose(first[k], second[k], atol=1e-7) for k in first)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_checkpoints_record_their_method_and_config_and_resume_only_the_same_method(tiny_model_dir, run_dir):
    from tailor.errors import TailorError
    from tailor.train.checkpoint import RUN_FILE, latest

    config = config_for(tiny_model_dir, max_steps=6, save_every=3)
    run_training(config, run_dir, run_dir, show_progress=False, should_stop=lambda step: step == 4)
    folder = latest(run_dir)
    recorded = json.loads((folder / RUN_FILE).read_text())
    assert folder.name == "step-4" and recorded["method"] == "lora"
    assert recorded["config"]["train"]["save_every"] == 3 and recorded["config"]["base_model"] == tiny_model_dir
    # the method's options resolved: what the user wrote and the defaults filled in
    assert recorded["config"]["methods"]["lora"] == config.method_options("lora").model_dump(mode="json")
    assert recorded["config"]["methods"]["lora"]["r"] == 4 and "dropout" in recorded["config"]["methods"]["lora"]

    other = config_for(tiny_model_dir, max_steps=6, save_every=3, method="full")
    with pytest.raises(TailorError, match=r"--resume: .*step-4 was trained by method 'lora', not 'full'; resume "
                                          r"with train\.method=lora"):
        run_training(other, run_dir, run_dir, resume=True, show_progress=False)
    resumed = run_training(config, run_dir, run_dir, resume=True, show_progress=False)  # the same method resumes
    assert resumed.steps == 6


def test_missing_data_is_a_clear_error(tiny_model_dir, tmp_path):
    from tailor.errors import TailorError

    with pytest.raises(TailorError, match=r"train\.jsonl: not found; run `tailor data build` first"):
        run_training(config_for(tiny_model_dir), tmp_path, tmp_path, show_progress=False)


def test_unknown_lora_target_is_rejected_before_training(tiny_model_dir, run_dir):
    from tailor.errors import TailorError

    config = validate_config({"base_model": tiny_model_dir, "methods": {"lora": {"targets": ["qkv"]}}})
    with pytest.raises(TailorError, match="methods.lora.targets: the model has no module named qkv"):
        run_training(config, run_dir, run_dir, show_progress=False)


def test_packing_trains_like_padding(tiny_model_dir, run_dir, tmp_path_factory):
    """The same examples per step, packed or padded: the same weights (only float summation order differs)."""
    padded = tmp_path_factory.mktemp("padded")
    write_jsonl(padded / "data" / "train.jsonl", [json.loads(x) for x in (run_dir / "data" / "train.jsonl").open()])
    run_training(config_for(tiny_model_dir, max_steps=3, packing=True, pack_length=96), run_dir, run_dir,
                 show_progress=False)
    run_training(config_for(tiny_model_dir, max_steps=3, packing=False), padded, padded, show_progress=False)
    first, second = adapter_weights(run_dir), adapter_weights(padded)
    assert any(first[k].abs().sum() > 0 for k in first if "lora_B" in k)
    assert all(torch.allclose(first[k], second[k], atol=1e-5) for k in first)


def test_gradient_checkpointing_changes_memory_not_results(tiny_model_dir, run_dir, tmp_path_factory):
    plain = tmp_path_factory.mktemp("plain")
    write_jsonl(plain / "data" / "train.jsonl", [json.loads(x) for x in (run_dir / "data" / "train.jsonl").open()])
    run_training(config_for(tiny_model_dir, max_steps=2, gradient_checkpointing=True), run_dir, run_dir,
                 show_progress=False)
    run_training(config_for(tiny_model_dir, max_steps=2), plain, plain, show_progress=False)
    first, second = adapter_weights(run_dir), adapter_weights(plain)
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)


def test_metrics_also_go_to_tensorboard(tiny_model_dir, run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_training(config_for(tiny_model_dir, max_steps=3, report_to=["tensorboard"]), run_dir, run_dir,
                 show_progress=False)
    event_files = list((run_dir / "logs").rglob("events.out.tfevents.*"))
    assert event_files
    scalars = {}
    for path in event_files:
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars[tag] = [event.step for event in events.Scalars(tag)]
    assert scalars["train/loss"] == [1, 2, 3] and "eval/loss" in scalars


def test_report_to_rejects_unknown_trackers(tiny_model_dir):
    from tailor.errors import TailorError

    with pytest.raises(TailorError, match=r"train\.report_to"):
        validate_config({"base_model": tiny_model_dir, "train": {"report_to": ["neptune"]}})
