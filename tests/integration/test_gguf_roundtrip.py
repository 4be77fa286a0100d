"""The default model end to end into GGUF: a short LoRA run on the city questions, merged, written as GGUF (f16),
read back by llama.cpp itself (the prebuilt build `make setup` installs), which must answer the golden prompts like the
adapter on the base does."""

import time

import pytest
import torch

from tailor.config import validate_config
from tailor.data.qa import read_qa_file, to_chat
from tailor.models.export import export_run
from tailor.models.gguf import GGUF_FILE
from tailor.train.run import run_training
from tailor.workspace import write_jsonl
from tests.conftest import EXAMPLE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def city_run(tmp_path_factory):
    """Four LoRA steps on the city's questions: enough to move the answers away from the base model's."""
    folder = tmp_path_factory.mktemp("city")
    system = "You answer residents' questions about Maplewood city services in one short sentence."
    pairs = list(read_qa_file(EXAMPLE / "qa" / "train.jsonl"))[:16]
    write_jsonl(folder / "data" / "train.jsonl", [to_chat(pair, system) for pair in pairs])
    config = validate_config({"system_prompt": system, "methods": {"lora": {"r": 8, "alpha": 16}},
                              "train": {"max_steps": 4, "batch_size": 4, "learning_rate": 2e-3, "save_every": 0}})
    run_training(config, folder, folder, show_progress=False)
    return folder


def test_gguf_answers_like_the_adapter(city_run):
    torch.set_num_threads(2)
    started = time.perf_counter()
    result = export_run(city_run, "gguf", verify=True, tolerance=None)
    report = result.verify
    print(f"gguf f16 in {report.reader}: exact match {report.exact_match:.0%}, "
          f"largest logit difference {report.max_logit_diff:.3g}, "
          f"{time.perf_counter() - started:.0f} s")
    assert (result.folder / GGUF_FILE).stat().st_size > 200e6  # 135M parameters in f16
    assert report.reader == "llama.cpp"
    assert all(report.tokenizer_match)  # the reader splits the templated prompts into the same tokens
    assert report.exact_match >= 0.8
    assert report.max_logit_diff < 1.0
