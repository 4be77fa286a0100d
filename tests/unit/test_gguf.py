"""GGUF export on the tiny model: llama.cpp itself (llama-cpp-cffi's prebuilt build, which `make setup` installs, or
llama-cpp-python) loads the file and computes the model's logits, so tensor names, the q/k
permutation and the hyperparameters are right; its tokenizer splits text like the model's; the metadata carries the
chat template; `--verify` compares with adapter-on-base; bad input writes nothing."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tailor.errors import TailorError
from tailor.models.base import load_tokenizer
from tailor.models.export import EXPORT_INFO, export_run
from tailor.models.gguf import GGUF_FILE, open_gguf_reader, permute_rotary, pre_tokenizer_name, write_gguf
from tailor.workspace import read_json
from tests.unit.test_export import train_run

TEXT = "The library opens at nine on weekdays."


@pytest.fixture(scope="module")
def written(tiny_model_dir, tmp_path_factory):
    """The tiny model written as f16 and q8_0 GGUF files."""
    folder = tmp_path_factory.mktemp("gguf")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    counts = {kind: write_gguf(model, tokenizer, tiny_model_dir, folder / f"{kind}.gguf", kind)
              for kind in ("f16", "q8_0")}
    return model, tokenizer, folder, counts


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    torch.set_num_threads(1)
    return train_run(tmp_path_factory.mktemp("lora"), tiny_model_dir, "lora", {"r": 4, "alpha": 8})


def test_gguf_reader_computes_the_same_logits(written):
    model, tokenizer, folder, counts = written
    assert counts["f16"] == {"F16": 15, "F32": 5} and counts["q8_0"] == {"Q8_0": 15, "F32": 5}  # norms stay f32
    assert (folder / "q8_0.gguf").stat().st_size < 0.7 * (folder / "f16.gguf").stat().st_size
    ids = tokenizer(TEXT).input_ids
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()  # [tokens, vocab]
    for kind, tolerance in (("f16", 5e-3), ("q8_0", 5e-2)):
        # a wrong q/k permutation, tensor name or norm epsilon shows up here as differences of order 1
        found = open_gguf_reader(folder / f"{kind}.gguf").logits(ids)
        assert np.abs(found - expected).max() < tolerance, kind


def test_metadata_carries_the_tokenizer(written):
    model, tokenizer, folder, _ = written
    from gguf import GGUFReader

    fields = GGUFReader(folder / "f16.gguf").fields  # as the gguf package (llama.cpp's own reader in Python) reads it

    def value(key):
        return fields[key].contents()

    assert value("general.architecture") == "llama" and value("llama.block_count") == 2
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert value("tokenizer.chat_template") == tokenizer.chat_template
    assert value("llama.attention.head_count_kv") == 2


def test_permutation_interleaves_rotary_halves():
    heads, head_dim = 2, 4
    weight = np.arange(heads * head_dim, dtype=np.float32)[:, None]  # row i holds i
    # per head, transformers' halves [0 1 | 2 3] become llama.cpp's pairs [0 2 1 3]
    assert permute_rotary(weight, heads)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_gguf_reader_generates_like_the_model(written):
    model, tokenizer, folder, _ = written
    ids = tokenizer(TEXT).input_ids
    llm = open_gguf_reader(folder / "f16.gguf")
    assert llm.reader == "llama.cpp"  # `make setup` installs a prebuilt llama.cpp: the file is checked by its runtime
    answer = llm.greedy(ids, 6, stop_ids=set())
    with torch.no_grad():
        expected = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    assert len(answer) == 6 and answer[:3] == expected[:3]  # random tiny weights: near-ties may flip later tokens
    assert llm.tokenize(TEXT) == ids  # the GPT-2 pre-tokenizer and merges read from the file agree


def test_export_gguf_with_verify(lora_run):
    result = export_run(lora_run, "gguf", verify=True, tolerance=None)
    assert result.folder == lora_run / "export" / "gguf" and GGUF_FILE in result.files
    report = result.verify
    assert len(report.matches) == 5 and all(report.tokenizer_match)
    assert report.max_logit_diff < 2e-2  # f16 weights against fp32 adapter-on-base
    assert report.exact_match >= 0.6  # random tiny weights: near-ties may flip a later token
    info = read_json(result.folder / EXPORT_INFO)
    assert info["format"] == "gguf" and info["verify"]["exact_match"] == report.exact_match


def test_bad_input_writes_nothing(lora_run, tiny_model_dir, tmp_path):
    with pytest.raises(TailorError, match="exceeds the tolerance"):
        export_run(lora_run, "gguf-q8_0", tmp_path / "out", verify=True, tolerance=1e-9)
    assert not (tmp_path / "out").exists()
    with pytest.raises(TailorError, match="pre-tokenizer \\(Metaspace\\) has no known llama.cpp equivalent"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}})
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(TailorError, match="only Llama-architecture models"):
        write_gguf(gpt2, load_tokenizer(tiny_model_dir), tiny_model_dir, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
