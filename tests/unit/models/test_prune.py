"""`tailor prune` on a tiny trained LoRA run: magnitude pruning reaches its sparsity, structured pruning really
shrinks the matrices and the saved model, and the pruned model still loads and generates."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tailor.config import validate_config
from tailor.errors import TailorError
from tailor.models.base import load_tokenizer
from tailor.models.prune import linear_sparsity, magnitude_prune, prune_heads, prune_neurons, prune_run
from tailor.train.run import run_training
from tailor.workspace import read_json, write_jsonl

FACTS = [("When is the library open?", "Monday to Friday, 9 am to 7 pm."),
         ("How much is a parking permit?", "A parking permit costs $45 per year.")]
RECORDS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS]


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("lora")
    write_jsonl(folder / "data" / "train.jsonl", RECORDS * 4)
    write_jsonl(folder / "data" / "eval.jsonl", RECORDS)
    config = validate_config({"base_model": tiny_model_dir, "methods": {"lora": {"r": 4, "alpha": 8}},
                              "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 5e-2, "dtype": "fp32",
                                        "save_every": 0}})
    run_training(config, folder, folder, show_progress=False)
    return folder


def generates(folder):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = load_tokenizer(str(folder))
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    output = model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    return model, output.shape[1] - ids.shape[1]


def test_magnitude_reaches_the_target_sparsity(lora_run, tmp_path):
    report = prune_run(lora_run, "magnitude", sparsity=0.6, out=tmp_path / "out")
    assert report.sparsity == pytest.approx(0.6, abs=1e-3)
    assert report.after.parameters == report.before.parameters  # unstructured: same shapes
    assert report.after.nonzero_parameters < report.before.nonzero_parameters
    assert report.before.eval_loss > 0 and report.after.eval_loss != report.before.eval_loss
    model, new_tokens = generates(tmp_path / "out")
    assert new_tokens == 4 and linear_sparsity(model) == pytest.approx(0.6, abs=1e-3)  # the zeros were saved
    saved = read_json(tmp_path / "out" / "report.json")
    assert saved["sparsity"] == report.sparsity and saved["after"]["ms_per_token"] > 0


def test_structured_removes_heads_and_neurons(lora_run, tmp_path):
    report = prune_run(lora_run, "structured", heads=0.5, neurons=0.25, out=tmp_path / "out")
    assert report.shapes == {"heads": [4, 2], "intermediate_size": [128, 96]}
    assert report.after.parameters < report.before.parameters and report.after.size_bytes < report.before.size_bytes
    model, new_tokens = generates(tmp_path / "out")
    assert new_tokens == 4
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert tuple(attention.q_proj.weight.shape) == (2 * 16, 64) and tuple(attention.o_proj.weight.shape) == (64, 32)
    assert tuple(attention.k_proj.weight.shape) == (2 * 16, 64)  # key/value heads kept
    assert tuple(mlp.up_proj.weight.shape) == (96, 64) and tuple(mlp.down_proj.weight.shape) == (64, 96)


def test_structured_keeps_the_important_units():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    mlp, attention = model.model.layers[0].mlp, model.model.layers[0].self_attn
    with torch.no_grad():
        mlp.up_proj.weight[5] *= 100  # neuron 5 matters most
        attention.q_proj.weight[3 * 8:4 * 8] *= 100  # head 3 (group 1) matters most
    up_row = mlp.up_proj.weight[5].clone()
    head_rows = attention.q_proj.weight[3 * 8:4 * 8].clone()
    assert prune_neurons(model, 0.75) == 2 and prune_heads(model, 0.5) == 2
    assert any(torch.equal(row, up_row) for row in mlp.up_proj.weight)
    assert torch.equal(attention.q_proj.weight[8:16], head_rows)  # kept as the second (group 1) head
    ids = torch.tensor([[1, 2, 3]])
    assert model(input_ids=ids).logits.shape == (1, 3, 50)


def test_magnitude_prune_direct_and_bad_input(lora_run, tmp_path):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    assert magnitude_prune(model, 0.3) == pytest.approx(0.3, abs=1e-3)
    for kwargs, message in [({"method": "random"}, "unknown pruning method 'random'"),
                            ({"method": "magnitude", "sparsity": 1.5}, "--sparsity: 1.5 must be between 0 and 1"),
                            ({"method": "structured"}, "give --heads and/or --neurons"),
                            ({"method": "structured", "heads": 1.0}, "--heads: 1.0 must be at least 0"),
                            ({"method": "structured", "heads": 0.25}, "--heads: 0.25 removes no head; each of the 2 "
                                                                      "key/value groups has 2 query heads")]:
        with pytest.raises(TailorError, match=message):
            prune_run(lora_run, out=tmp_path / "x", **kwargs)
        assert not (tmp_path / "x").exists()
