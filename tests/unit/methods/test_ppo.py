"""PPO on the tiny model: the policy moves towards a trivially learnable rule within a bounded number of iterations
while the KL to the reference stays finite; a broken reward function stops the run naming the prompt."""

import json
import math

import pytest
import torch

from tailor.config import validate_config
from tailor.errors import TailorError
from tailor.methods.ppo import advantages_and_returns
from tailor.train.run import run_training
from tests.unit.helpers import yes_margin


def config(model_dir, function, **ppo):
    return validate_config({"base_model": str(model_dir), "train": {"method": "ppo", "learning_rate": 1e-2,
                                                               "scheduler": "constant", "warmup_ratio": 0.0,
                                                               "dtype": "fp32", "seed": 1},
                            "methods": {"ppo": {"reward_function": f"test_rewards:{function}", "r": 8, "alpha": 16,
                                                "iterations": 16, "rollout_batch": 16, "mini_batch": 8,
                                                "ppo_epochs": 2, "max_new_tokens": 4, "kl_coef": 0.01} | ppo}})


def test_ppo_raises_the_mean_reward_and_keeps_kl_finite(tiny_model_dir, workspace):
    result = run_training(config(workspace / "sft" / "model", "says_yes"), workspace, workspace, show_progress=False)
    lines = [json.loads(line) for line in (workspace / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == len(lines) == 64  # 16 iterations x 2 passes x 2 mini-batches of 8 rollouts
    assert [line["iteration"] for line in lines[::4]] == list(range(1, 17))
    assert all(math.isfinite(line["kl"]) and math.isfinite(line["value_loss"]) for line in lines)
    rewards = [line["reward"] for line in lines[::4]]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    # 16 sampled answers per iteration make the mean reward too noisy to show the change on this tiny model
    # (seeds 1-4: last quarter -0.06 to +0.23 against the first); the policy itself moves: log P("Yes.") - log P("No.")
    # rose from -0.01 to 0.43-0.71 on those seeds
    assert 0.1 < first < 0.9 and last > first - 0.1, rewards
    before, after = yes_margin(workspace / "sft" / "model"), yes_margin(workspace / "sft" / "model", workspace)
    assert after > before + 0.3, (before, after)
    assert all(key in lines[-1] for key in ("entropy", "clip_fraction", "policy_loss", "lr", "grad_norm"))
    assert lines[-1]["tokens_per_s"] > 0
    assert (workspace / "adapter" / "adapter_config.json").is_file()
    assert json.loads((workspace / "manifest.json").read_text())["stages"]["train"]["method"] == "ppo"


@pytest.mark.parametrize("function, message", [
    ("broken", r"test_rewards:broken raised ValueError: no score today on the prompt 'Is topic \d open\?'"),
    ("not_a_number", r"test_rewards:not_a_number returned 'high', not a finite number, on the prompt 'Is topic"),
    ("missing", r"test_rewards has no function 'missing'"),
])
def test_a_bad_reward_function_stops_the_run_with_the_prompt(tiny_model_dir, prompts_workspace, function, message):
    with pytest.raises(TailorError, match=rf"methods\.ppo\.reward_function: {message}"):
        run_training(config(tiny_model_dir, function, iterations=1), prompts_workspace, prompts_workspace,
                     show_progress=False)
    assert not (prompts_workspace / "adapter").exists()


def test_gae_with_gamma_and_lambda_one_is_the_reward_to_go_minus_the_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the 4th position is past the answer's end: ignored
    values = torch.tensor([[0.5, 0.25, 0.0, 9.0]])
    _, returns = advantages_and_returns(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
