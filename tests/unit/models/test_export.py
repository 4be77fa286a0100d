"""Export on tiny trained runs: merged weights answer like adapter-on-base, prompt-learning methods are refused and
exported as prompt artifacts instead, prompt tables travel with the weights, the int8 export loads and generates, and
a failed verification or a corrupted artifact writes nothing."""

import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from tailor.config import validate_config
from tailor.errors import TailorError
from tailor.models.base import load_tokenizer
from tailor.models.export import (
    EXPORT_INFO,
    INT8_WEIGHTS,
    VerifyFailed,
    export_run,
    load_int8,
    load_reference,
    read_trained_run,
)
from tailor.train.run import run_training
from tailor.workspace import file_sha256, read_json, write_json, write_jsonl

FACTS = [("When is the library open?", "Monday to Friday, 9 am to 7 pm."),
         ("How much is a parking permit?", "A parking permit costs $45 per year.")]


def train_run(folder, model_dir, method, options):
    write_jsonl(folder / "data" / "train.jsonl",
                [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                 for q, a in FACTS * 4])
    # a high learning rate so that two steps move the adapter far enough from the base to tell them apart
    config = validate_config({"base_model": model_dir, "methods": {method: options},
                              "train": {"method": method, "max_steps": 2, "batch_size": 4, "learning_rate": 5e-2,
                                        "dtype": "fp32", "save_every": 0}})
    run_training(config, folder, folder, show_progress=False)
    return folder


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    torch.set_num_threads(1)
    return train_run(tmp_path_factory.mktemp("lora"), tiny_model_dir, "lora", {"r": 4, "alpha": 8})


def logits(model, tokenizer):
    ids = tokenizer("The library opens at nine on weekdays.", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits  # [1, tokens, vocab]


def test_merged_export_matches_adapter_on_base(lora_run, tiny_model_dir):
    result = export_run(lora_run, "merged", verify=True)
    assert result.folder == lora_run / "export" / "merged"
    assert result.verify.passed and result.verify.exact_match == 1.0 and result.verify.max_logit_diff < 1e-3
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(result.files)
    assert read_json(result.folder / EXPORT_INFO)["verify"]["passed"] is True

    tokenizer = load_tokenizer(str(result.folder))
    assert tokenizer.chat_template  # the folder chats on its own
    merged = AutoModelForCausalLM.from_pretrained(result.folder).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    reference = load_reference(read_trained_run(lora_run))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.testing.assert_close(logits(merged, tokenizer), logits(reference, tokenizer), atol=1e-4, rtol=0)
    assert (logits(base, tokenizer) - logits(merged, tokenizer)).abs().max() > 1e-3  # the adapter did change it


def test_int8_export_loads_and_generates(lora_run):
    result = export_run(lora_run, "int8", verify=True, tolerance=None)
    assert INT8_WEIGHTS in result.files
    assert result.verify.tolerance is None and result.verify.passed  # int8: reported, not enforced
    assert 0.0 <= result.verify.exact_match <= 1.0 and result.verify.max_logit_diff > 0
    model = load_int8(result.folder)
    assert not any(type(module) is torch.nn.Linear for module in model.modules())  # every Linear is int8
    tokenizer = load_tokenizer(str(result.folder))
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    output = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > ids.shape[1]


def test_failed_verification_writes_nothing(lora_run, tmp_path):
    target = tmp_path / "int8"
    with pytest.raises(VerifyFailed, match="exceeds the tolerance"):
        export_run(lora_run, "int8", target, verify=True, tolerance=1e-9)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_prompt_learning_is_refused_and_exported_as_prompts(tiny_model_dir, tmp_path):
    run = train_run(tmp_path, tiny_model_dir, "p_tuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 16})
    for fmt in ("merged", "gguf"):
        with pytest.raises(TailorError, match="p_tuning: cannot be merged .* export the adapter with its prompt "
                                              "table instead: `tailor export .* --format prompt`"):
            export_run(run, fmt)
    assert not (run / "export").exists()
    result = export_run(run, "prompt")
    assert result.folder == run / "export" / "prompt"
    assert {"adapter/adapter_config.json", "prompt_table.safetensors", "prompt_table.json", "PROMPTS.md"} <= \
        set(result.files)
    assert result.files["prompt_table.safetensors"] == file_sha256(run / "prompt_table.safetensors")
    readme = (result.folder / "PROMPTS.md").read_text()
    assert "p-tuning's prompt table" in readme and "cannot be merged" in readme
    assert read_json(result.folder / EXPORT_INFO)["prompt_artifacts"] == ["prompt_table.json",
                                                                          "prompt_table.safetensors", "adapter"]


def test_prompt_tables_travel_with_a_weights_export(lora_run, tmp_path):
    run = shutil.copytree(lora_run, tmp_path / "run", ignore=shutil.ignore_patterns("export"))
    save_file({"default": torch.zeros(4, 64)}, str(run / "prompt_table.safetensors"))
    write_json(run / "prompt_table.json", {"default": {"base_model": "tiny"}})
    result = export_run(run, "merged", tmp_path / "out")
    assert {"model.safetensors", "prompt_table.safetensors", "prompt_table.json", "PROMPTS.md"} <= set(result.files)


def test_corrupted_artifact_writes_nothing(lora_run, tmp_path):
    run = shutil.copytree(lora_run, tmp_path / "run", ignore=shutil.ignore_patterns("export"))
    weights = run / "adapter" / "adapter_model.safetensors"
    registered = {"adapter/adapter_model.safetensors": file_sha256(weights)}
    weights.write_bytes(b"\x00" * 16 + weights.read_bytes()[16:])  # the header is destroyed
    with pytest.raises(TailorError, match="checksum mismatch with the registry .*nothing was written"):
        export_run(run, "merged", expected_checksums=registered)
    with pytest.raises(TailorError, match="the artifact is corrupted and cannot be loaded .*nothing was written"):
        export_run(run, "merged")
    assert not (run / "export").exists()


def test_bad_format_and_foreign_out_folder(lora_run, tmp_path):
    with pytest.raises(TailorError, match="unknown format 'onnx' \\(formats: merged, int8, gguf, gguf-q8_0, "
                                          "prompt\\)"):
        export_run(lora_run, "onnx")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TailorError, match="exists and is not a tailor export"):
        export_run(lora_run, "merged", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
