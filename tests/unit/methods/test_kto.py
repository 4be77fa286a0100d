"""KTO on the tiny model from what the chat page collects: thumbs in the server's own feedback database."""

import json

import pytest
import torch

from tailor.config import validate_config
from tailor.errors import TailorError
from tailor.methods.kto import KtoLoss, KtoOptions, load_examples
from tailor.serve.feedback import FeedbackStore
from tailor.train.run import run_training
from tailor.workspace import write_jsonl

TOPICS = ["library", "parking", "pool", "permits", "taxes", "trash", "parks", "water"]


def feedback_db(path):
    """Polite answers got a thumbs up, curt ones a thumbs down; one curt answer was corrected."""
    store = FeedbackStore(path)
    for i, topic in enumerate(TOPICS):
        prompt = [{"role": "user", "content": f"Who handles {topic}?"}]
        for kind, answer in (("up", f"Please contact the {topic.title()} Department, thank you."),
                             ("down", f"{topic}. figure it out")):
            store.record_completion(id=f"{kind}-{i}", model="city", alias=None, endpoint="chat", prompt=prompt,
                                    answer=answer, user=None, latency_ms=1.0, first_token_ms=1.0,
                                    completion_tokens=5)
            store.add_feedback(response_id=f"{kind}-{i}", rating=kind,
                               correction="Please ask the Clerk Department." if (kind, i) == ("down", 0) else None)
    store.close()
    return path


def config(model_dir, examples_file, **train):
    return validate_config({"base_model": model_dir, "train": {
        "method": "kto", "max_steps": 12, "batch_size": 8, "learning_rate": 2e-2, "scheduler": "constant",
        "warmup_ratio": 0.0, "dtype": "fp32"} | train,
        "methods": {"kto": {"r": 4, "alpha": 8, "beta": 0.5, "examples_file": str(examples_file)}}})


def test_kto_learns_from_thumbs_in_the_feedback_database(tiny_model_dir, tmp_path):
    db = feedback_db(tmp_path / "feedback.db")
    examples = load_examples(db)
    assert len(examples) == 17 and sum(e["label"] for e in examples) == 9  # 8 up + 1 correction
    assert {"completion": "Please ask the Clerk Department.", "label": True}.items() <= examples[2].items()

    result = run_training(config(tiny_model_dir, db), tmp_path, tmp_path, show_progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 12 == len(lines)
    assert lines[0]["loss"] == pytest.approx(0.5, abs=0.01)  # policy == reference: 1 - σ(0) for every example
    # batches of 8, 8 and 1 examples: the one-example batch's KL estimate is noisy, so compare the last four steps
    assert sum(line["loss"] for line in lines[-4:]) / 4 < 0.35
    assert min(line["accuracy"] for line in lines[-4:]) > 0.8 and lines[-1]["tokens_per_s"] > 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["stages"]["train"]["method"] == "kto"
    assert manifest["metrics"]["train.desirable"] == 9 and manifest["metrics"]["train.undesirable"] == 8


def test_the_kl_baseline_moves_the_losses_and_takes_no_gradient():
    options = KtoOptions(beta=1.0, desirable_weight=2.0)
    loss = KtoLoss(options, pad_id=0)

    class Fixed(torch.nn.Module):  # log-probabilities as parameters: matched rows, then mismatched rows
        def __init__(self):
            super().__init__()
            self.logps = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5, 0.7]))

    model = Fixed()
    import tailor.methods.kto as kto

    calls = iter([model.logps[:2], model.logps[2:]])
    original, kto.sequence_log_probs = kto.sequence_log_probs, lambda m, b: next(calls)
    try:
        batch = {"matched": None, "mismatched": None, "reference": torch.zeros(2, 2),
                 "desirable": torch.tensor([True, False])}
        total, stats = loss(model, batch)
    finally:
        kto.sequence_log_probs = original
    z = 0.6  # mean of the mismatched log-ratios, clamped at 0
    expected = 2.0 * (1 - torch.sigmoid(torch.tensor(1.0 - z))) + (1 - torch.sigmoid(torch.tensor(z + 1.0)))
    assert float(total) == pytest.approx(float(expected), abs=1e-6)
    assert float(stats["kl"]) == pytest.approx(2 * z) and int(stats["accuracy"]) == 2
    total.backward()
    assert model.logps.grad[2:].abs().sum() == 0 and model.logps.grad[:2].abs().sum() > 0


def test_bad_examples_are_named_by_file_and_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "rated.jsonl"
    write_jsonl(bad, [{"prompt": "hi", "completion": "hello", "label": True},
                      {"prompt": "hi", "completion": "hello", "label": "yes"}])
    with pytest.raises(TailorError, match=r"rated\.jsonl:2: \"label\" must be true"):
        run_training(config(tiny_model_dir, bad), tmp_path, tmp_path, show_progress=False)
    with pytest.raises(TailorError, match=r"methods\.kto\.examples_file: .*missing\.jsonl not found"):
        run_training(config(tiny_model_dir, tmp_path / "missing.jsonl"), tmp_path, tmp_path, show_progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()
