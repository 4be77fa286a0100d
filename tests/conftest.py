"""Shared fixtures: a tiny randomly initialized Llama model (2 layers, width 64) with the default model's tokenizer
and chat template, so unit tests exercise the real code paths in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "city-services"


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The real default model, converted from the bundled GGUF once and cached."""
    from tailor.models.base import resolve_base_model

    return resolve_base_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tailor.models.base import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = load_tokenizer(default_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
