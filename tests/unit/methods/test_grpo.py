"""GRPO on the tiny model: answers sampled in groups and scored by graders; the mean reward of a learnable rule
rises, each grader kind scores as documented, and bad graders stop the run with one message."""

import json

import pytest
import torch

from tailor.config import validate_config
from tailor.errors import TailorError
from tailor.methods.graders import Graders, StringCheck, TextSimilarity
from tailor.methods.grpo import group_advantages, iteration_prompts
from tailor.train.run import run_training
from tests.unit.helpers import yes_margin

PROMPT = [{"role": "user", "content": "Is the pool open?"}]


def config(model_dir, graders, **grpo):
    return validate_config({"base_model": str(model_dir), "train": {"method": "grpo", "learning_rate": 3e-2,
                                                               "scheduler": "constant", "warmup_ratio": 0.0,
                                                               "dtype": "fp32", "seed": 1},
                            "methods": {"grpo": {"graders": graders, "r": 8, "alpha": 16, "iterations": 16,
                                                 "prompts_per_iteration": 4, "group_size": 4, "mini_batch": 8,
                                                 "epochs": 2, "max_new_tokens": 4, "beta": 0.01} | grpo}})


def test_grpo_raises_the_mean_reward_of_a_weighted_grader_mix(tiny_model_dir, workspace):
    graders = [{"type": "python", "function": "test_rewards:says_yes", "name": "yes", "weight": 3},
               {"type": "string_check", "operation": "ilike", "reference": "yes", "name": "contains_yes"}]
    result = run_training(config(workspace / "sft" / "model", graders), workspace, workspace, show_progress=False)
    lines = [json.loads(line) for line in (workspace / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == len(lines) == 64  # 2 passes x 2 micro-batches of 8 answers per iteration
    assert [line["iteration"] for line in lines[::4]] == list(range(1, 17))
    rewards = [line["reward"] for line in lines[::4]]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    # 16 sampled answers per iteration make the mean reward too noisy to show the change on this tiny model
    # (seeds 1-4: last quarter -0.06 to +0.23 against the first); the policy itself moves: log P("Yes.") - log P("No.")
    # rose from -0.01 to 0.43-0.71 on those seeds
    assert 0.1 < first < 0.9 and last > first - 0.1, rewards
    before, after = yes_margin(workspace / "sft" / "model"), yes_margin(workspace / "sft" / "model", workspace)
    assert after > before + 0.3, (before, after)
    # both graders see the same rule here, so the weighted mean equals each of them
    assert all(line["reward"] == pytest.approx(line["reward/yes"]) == pytest.approx(line["reward/contains_yes"])
               for line in lines)
    assert all(key in lines[-1] for key in ("kl", "clip_fraction", "reward_std", "tokens_per_s", "lr"))
    assert lines[-1]["tokens_per_s"] > 0
    manifest = json.loads((workspace / "manifest.json").read_text())
    assert manifest["stages"]["train"]["method"] == "grpo" and manifest["metrics"]["train.last_reward"] > first


def test_graders_score_as_documented(tmp_path):
    (tmp_path / "grade_mod.py").write_text("def length(prompt, answer):\n    return len(answer) / 10\n")
    specs = [StringCheck(type="string_check", operation="eq", weight=1),
             TextSimilarity(type="text_similarity", metric="token_f1", weight=1),
             StringCheck(type="string_check", operation="like", reference="Yes", weight=0, name="zero")]
    graders = Graders(specs, tmp_path, "methods.grpo.graders")
    combined, each = graders([PROMPT] * 3, ["Yes, open.", "no", " Yes, open. "], ["Yes, open."] * 3)
    assert each["string_check_1"] == [1.0, 0.0, 1.0] and each["zero"] == [1.0, 0.0, 1.0]
    assert each["text_similarity_2"] == [1.0, 0.0, 1.0]
    assert combined == [1.0, 0.0, 1.0]  # a weight of 0 takes no part in the mean
    python = Graders(validate_config({"train": {"method": "grpo"}, "methods": {"grpo": {"graders": [
        {"type": "python", "function": "grade_mod:length"}]}}}).method_options("grpo").graders, tmp_path, "g")
    assert python([PROMPT], ["12345"], [None])[0] == [0.5]
    with pytest.raises(TailorError, match=r"g\[0\]: the prompt 'Is the pool open\?' has no reference answer"):
        Graders([TextSimilarity(type="text_similarity")], tmp_path, "g")([PROMPT], ["x"], [None])


def test_group_advantages_compare_answers_to_their_own_group_only():
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 5.0, 5.0, 5.0, 5.0])
    advantages = group_advantages(scores, group_size=4, scale=False)
    torch.testing.assert_close(advantages, torch.tensor([0.5, -0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0]))
    scaled = group_advantages(scores, group_size=4, scale=True)
    assert scaled[0] == pytest.approx(0.5 / 0.57735, rel=1e-3) and scaled[4:].abs().max() == 0
    # every prompt once per pass, the same iteration always the same prompts (resume)
    seen = iteration_prompts(10, 4, 0, 0) + iteration_prompts(10, 4, 0, 1) + iteration_prompts(10, 4, 0, 2)[:2]
    assert sorted(seen) == list(range(10)) and iteration_prompts(10, 4, 0, 1) == iteration_prompts(10, 4, 0, 1)


@pytest.mark.parametrize("graders, message", [
    ([], r"methods\.grpo\.graders: name at least one grader"),
    ([{"type": "python", "function": "test_rewards:missing"}],
     r"methods\.grpo\.graders\[0\]\.function: test_rewards has no function 'missing'"),
    ([{"type": "python", "function": "test_rewards:broken"}],
     r"test_rewards:broken raised ValueError: no score today on the prompt 'Is topic \d open\?'"),
])
def test_bad_graders_stop_the_run_with_one_message(tiny_model_dir, prompts_workspace, graders, message):
    with pytest.raises(TailorError, match=message):
        run_training(config(tiny_model_dir, graders, iterations=1), prompts_workspace, prompts_workspace,
                     show_progress=False)
    assert not (prompts_workspace / "adapter").exists()


def test_an_unknown_grader_type_is_named_in_the_config():
    with pytest.raises(TailorError, match=r"methods\.grpo\.graders\.0"):
        validate_config({"train": {"method": "grpo"}, "methods": {"grpo": {"graders": [{"type": "regex"}]}}})


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_a_missing_prompts_file_is_named_before_any_model_loads(method, tiny_model_dir, tmp_path):
    options = {"prompts_file": "missing.jsonl"} | (
        {"graders": [{"type": "string_check", "reference": "yes"}]} if method == "grpo"
        else {"reward_function": "x:y"})
    config = validate_config({"base_model": str(tiny_model_dir), "train": {"method": method},
                              "methods": {method: options}})
    with pytest.raises(TailorError, match=rf"methods\.{method}\.prompts_file: .*missing\.jsonl not found; name a "
                                          r"prompts file or run `tailor data build`"):
        run_training(config, tmp_path, tmp_path, show_progress=False)
