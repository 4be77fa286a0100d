"""`serve.adapters`: more customizations served beside the run's own by `tailor serve` / `tailor chat`
(`build_engine`), on the tiny model; a missing folder or a name clash is one error naming the key, before the model
loads."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from tailor.cli.serving import build_engine
from tailor.config import CONFIG_NAME, load_config
from tailor.errors import TailorError
from tailor.methods.prompt import PromptProfile, save_profile
from tests.unit.helpers import tailor

QUESTION = [{"role": "user", "content": "When is the library open?"}]


def _lora(tiny_model_dir: str, folder: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, weight in model.named_parameters():
        if "lora_B" in name:  # B starts at zero (a no-op adapter); perturb it so the adapter changes the output
            torch.nn.init.normal_(weight, std=1.0)
    model.save_pretrained(folder)


def _profile(folder: Path, examples: int = 2) -> None:
    save_profile(PromptProfile(system_prompt="Be brief.", k_shots=1, chain_of_thought=False,
                               embedding_model="unused-here", embeddings=torch.eye(examples, 8),
                               examples=[{"question": f"q{i}?", "answer": f"a{i}."} for i in range(examples)]),
                 folder)


@pytest.fixture(scope="module")
def artifacts(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter, a prompt-tuning soft prompt and a prompt profile, made once for the module."""
    root = tmp_path_factory.mktemp("served")
    _lora(tiny_model_dir, root / "parks", 1)
    _lora(tiny_model_dir, root / "run-adapter", 2)
    torch.manual_seed(3)
    tuned = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    tuned.prompt_encoder["default"].embedding.weight.data.normal_(std=1.0)
    tuned.save_pretrained(root / "soft")
    _profile(root / "faq")
    return root


def workspace(tmp_path: Path, tiny_model_dir: str, artifacts: Path, serve: dict, method: str = "lora"):
    """A workspace whose run holds a trained customization (a LoRA adapter, or a prompt profile for `prompt`)."""
    import shutil

    shutil.copytree(artifacts, tmp_path / "adapters")
    run = tmp_path / "run"
    if method == "prompt":
        _profile(run / "prompt")
    else:
        shutil.copytree(artifacts / "run-adapter", run / "adapter")
    (tmp_path / CONFIG_NAME).write_text(yaml.safe_dump({
        "base_model": tiny_model_dir, "train": {"method": method, "dtype": "fp32"}, "serve": serve}, sort_keys=False))
    config, root = load_config(tmp_path, [])
    return config, root, run


def test_configured_adapters_are_served_beside_the_run(tiny_model_dir, artifacts, tmp_path):
    config, root, run = workspace(tmp_path, tiny_model_dir, artifacts, {"max_new_tokens": 8, "adapters": {
        "parks": "adapters/parks", "soft": "adapters/soft", "faq": str(tmp_path / "adapters" / "faq")}})
    engine = build_engine(config, root, run)
    try:
        # the run's own customization stays last: `tailor chat` picks it by default
        assert engine.model_names() == ["base", "parks", "soft", "faq", "lora"]
        # sampled with one seed: the tiny random model answers greedily with newlines whatever the customization,
        # but its sampled tokens follow the logits that each customization changes
        answers = {name: "".join(engine.stream(name, QUESTION, temperature=1.0, seed=0))
                   for name in ("base", "parks", "soft", "lora")}
        assert answers["parks"] != answers["base"] and answers["soft"] != answers["base"]
        assert answers["parks"] != answers["lora"]  # the configured adapter, not the run's
    finally:
        engine.shutdown()


@pytest.mark.parametrize(("serve", "method", "message"), [
    ({"adapters": {"parks": "adapters/nowhere"}}, "lora", "serve.adapters.parks: .*adapters/nowhere does not exist"),
    ({"adapters": {"empty": "."}}, "lora", "serve.adapters.empty: .* is not a PEFT adapter folder"),
    ({"adapters": {"base": "adapters/parks"}}, "lora", "serve.adapters.base: .*taken by the base model"),
    ({"adapters": {"lora": "adapters/parks"}}, "lora", "serve.adapters.lora: .*taken by the run's customization"),
    ({"adapters": {"prompt": "adapters/parks"}}, "prompt",
     "serve.adapters.prompt: .*taken by the run's prompt profile"),
    ({"adapters": {"city-bot": "adapters/parks"}, "aliases": {"city-bot": {"base": 1.0}}}, "lora",
     "serve.adapters.city-bot: .*taken by an A/B alias"),
])
def test_bad_adapters_are_refused_before_the_model_loads(tiny_model_dir, artifacts, tmp_path, monkeypatch,
                                                         serve, method, message):
    config, root, run = workspace(tmp_path, tiny_model_dir, artifacts, serve, method)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before serve.adapters was checked")

    monkeypatch.setattr("tailor.serve.engine.Engine.__init__", no_loading)
    with pytest.raises(TailorError, match=message):
        build_engine(config, root, run)


def test_tailor_chat_reports_a_missing_folder_in_one_line(tiny_model_dir, artifacts, tmp_path):
    workspace(tmp_path, tiny_model_dir, artifacts, {"adapters": {"parks": "adapters/gone"}})
    result = tailor("chat", "-w", tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    flat = "".join(result.stderr.split())  # the terminal may wrap the line, even inside the path
    assert flat.startswith("error:serve.adapters.parks:") and "adapters/gone" in flat
