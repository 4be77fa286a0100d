"""Fixtures the unit tests of several stages share."""

import pytest
import torch

from tailor.config import validate_config
from tailor.train.run import run_training
from tailor.workspace import write_jsonl
from tests.unit.helpers import PROMPTS, REWARDS


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models do tiny matmuls: a second thread only adds synchronization (measured up to 10x slower here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# rollout methods (ppo, grpo): a workspace with rule-based rewards and yes/no prompts (tests/unit/helpers.py)
@pytest.fixture
def prompts_workspace(tmp_path):
    (tmp_path / "test_rewards.py").write_text(REWARDS)
    write_jsonl(tmp_path / "data" / "train.jsonl",
                [{"messages": p + [{"role": "assistant", "content": "Yes." if i % 2 else "No."}]}
                 for i, p in enumerate(PROMPTS)])
    return tmp_path


@pytest.fixture
def workspace(prompts_workspace, tiny_model_dir):
    """An SFT run (RUN/sft/model) that answers "Yes." or "No." about equally often: a random model spreads its samples
    over 49k tokens, so no rule gets a consistent signal in a few iterations; this policy already says both answers."""
    tmp_path = prompts_workspace
    # full fine-tuning: LoRA on a random width-64 model moves its outputs too slowly for a quick SFT
    sft = validate_config({"base_model": tiny_model_dir, "train": {
        "method": "full", "max_steps": 30, "batch_size": 8, "learning_rate": 3e-3, "scheduler": "constant",
        "dtype": "fp32", "save_every": 0}})
    (tmp_path / "sft" / "data").mkdir(parents=True)
    (tmp_path / "sft" / "data" / "train.jsonl").write_text((tmp_path / "data" / "train.jsonl").read_text())
    run_training(sft, tmp_path, tmp_path / "sft", show_progress=False)
    return tmp_path
