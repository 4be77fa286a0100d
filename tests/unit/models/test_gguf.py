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
from tailor.models.gguf import (
    GGUF_FILE,
    TransformersGGUF,
    open_gguf_reader,
    permute_rotary,
    pre_tokenizer_name,
    write_gguf,
)
from tailor.workspace import read_json
from tests.unit.models.test_export import train_run

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
        # a wrong q/k permutation, tensor name or norm epsilon shows up here as differences of order 1; the
        # fallback reader (transformers' GGUF loader, for machines without llama.cpp) is checked the same way
        for reader in (open_gguf_reader, TransformersGGUF):
            found = reader(folder / f"{kind}.gguf").logits(ids)
            assert np.abs(found - expected).max() < tolerance, (kind, reader)


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


def test_llama_cpp_engine_serves_the_gguf_to_the_openai_client(written, tiny_model_dir):
    """`serve.engine: llama_cpp`: llama.cpp computes each step on the GGUF file, tailor's sampler picks the tokens;
    greedy answers match the built-in engine on the same weights, streaming and stop strings work, the official
    client talks to it."""
    from openai import OpenAI

    from tailor.config import ServeConfig
    from tailor.serve.engine import Engine
    from tailor.serve.external import LlamaCppEngine, create_engine
    from tests.unit.helpers import start_server

    _, _, folder, _ = written
    engine = create_engine("llama_cpp", str(folder / "f16.gguf"), max_new_tokens=6)
    assert isinstance(engine, LlamaCppEngine) and engine.model_names() == ["base"]
    builtin = Engine(tiny_model_dir, dtype=torch.float32, max_new_tokens=6)
    question = [{"role": "user", "content": "When does the library open?"}]
    try:
        ours = engine.stream("base", question, temperature=0, max_tokens=6)
        answer = ours.text()
        expected = builtin.stream("base", question, temperature=0, max_tokens=6).text()
        assert ours.completion_tokens == 6 and ours.finish_reason == "length"
        assert answer[:8] == expected[:8]  # random tiny weights in f16: near-ties may flip a later token
        stop = answer[-2:]
        cut = engine.stream("base", question, temperature=0, max_tokens=6, stop=[stop]).text()
        assert cut == answer[:answer.find(stop)]  # the reply ends before the first stop string
        sampled = [engine.stream("base", question, temperature=1.0, seed=7, max_tokens=6).text() for _ in range(2)]
        assert sampled[0] == sampled[1]  # a seed makes sampling repeatable
        server, url = start_server(engine, config=ServeConfig(feedback_db=":memory:", request_log=None))
        try:
            client = OpenAI(base_url=f"{url}/v1", api_key="none")
            reply = client.chat.completions.create(model="base", messages=question, temperature=0, max_tokens=6)
            assert reply.choices[0].message.content == answer
            chunks = client.chat.completions.create(model="base", messages=question, temperature=0, max_tokens=6,
                                                    stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
        finally:
            server.should_exit = True
    finally:
        builtin.shutdown()
