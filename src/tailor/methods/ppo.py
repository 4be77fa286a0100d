"""PPO: reinforcement learning from a reward (Schulman et al., 2017, as used for RLHF by Ouyang et al., 2022).

Written out by hand in one readable loop (TRL no longer ships PPO). Each iteration:
1. rollouts: sample answers from the policy for a batch of prompts;
2. score each answer with a rule-based reward function (`module:function`) and/or a trained reward model;
3. per-token rewards: −kl_coef · (log π − log π_ref) on every answer token, plus the score on the last one;
4. advantages by GAE from a value head on the policy's hidden states;
5. several epochs of clipped policy and value losses over mini-batches of the rollouts.

The policy is LoRA: on an SFT run's adapter (whose frozen copy is the reference) or fresh on the base (whose
reference is the base with the adapter switched off), so there is one set of base weights in memory. The artifact is
the usual `RUN/adapter/`, so `tailor eval` and `tailor serve` use it unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from pydantic import Field

from tailor.config import TailorConfig
from tailor.errors import TailorError
from tailor.methods.alignment import (
    AnswerLogProbs,
    iteration_prompts,
    load_policy,
    load_prompts,
    prompts_path,
    reference,
    rollout,
    rollout_batches,
    train_rollouts,
)
from tailor.methods.graders import call_reward_function, load_reward_function
from tailor.methods.lora import UsesLora
from tailor.methods.registry import ROLLOUT_TRAIN_KEYS, Method, register
from tailor.models.base import load_tokenizer, pick_dtype, resolve_base_model
from tailor.train.loop import StepLoss, TrainResult, seed_everything


class PpoOptions(UsesLora):
    init_adapter: str | None = Field(None, description=(
        "Start from this LoRA adapter (an SFT run folder or its adapter/ folder); its frozen copy is the KL "
        "reference. null: a fresh adapter on the base, whose reference is the base."))
    reward_function: str | None = Field(None, description=(
        "A Python callable `module:function(prompt_messages, answer) -> float`, the module found in the workspace "
        "folder (e.g. rewards:style_reward for rewards.py)."))
    reward_model: str | None = Field(None, description="A reward run folder (`tailor train --method reward`).")
    reward_model_weight: float = Field(1.0, description="Weight of the reward model's score in the total reward.")
    prompts_file: str | None = Field(None, description=(
        "JSONL of prompts (chat `messages`, a final assistant turn is dropped, or `prompt`); "
        "null: the prompts of RUN/data/train.jsonl."))
    iterations: int = Field(20, gt=0, description="Rollout batches (each followed by ppo_epochs of updates).")
    rollout_batch: int = Field(8, gt=0, description="Prompts sampled per iteration.")
    mini_batch: int = Field(4, gt=0, description="Rollouts per gradient step.")
    ppo_epochs: int = Field(2, gt=0, description="Passes over each rollout batch.")
    max_new_tokens: int = Field(48, gt=0, description="Longest sampled answer.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    kl_coef: float = Field(0.05, ge=0, description="Per-token KL penalty against the reference.")
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clip ε.")
    value_clip: float = Field(0.2, gt=0, description="Clip of the value update around the rollout's values.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ.")


class Scorer:
    """Total reward of (prompt, answer) pairs: the rule-based function and/or the reward model."""

    def __init__(self, options: PpoOptions, root: Path):
        if not options.reward_function and not options.reward_model:
            raise TailorError("methods.ppo: name a reward_function (module:function) and/or a reward_model "
                              "(a reward run folder)")
        self.spec = options.reward_function
        self.function = (load_reward_function(options.reward_function, root, "methods.ppo.reward_function")
                         if options.reward_function else None)
        self.weight, self.model = options.reward_model_weight, None
        if options.reward_model:
            from tailor.methods.reward import load_reward_model, reward_folder

            self.model, self.tokenizer = load_reward_model(reward_folder(options.reward_model, root,
                                                                         "methods.ppo.reward_model"))

    def __call__(self, prompts: list[list[dict]], answers: list[str]) -> torch.Tensor:
        scores = [0.0] * len(prompts)
        if self.function is not None:
            assert self.spec is not None  # the function was loaded from it
            for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
                scores[i] += call_reward_function(self.function, self.spec, "methods.ppo.reward_function", prompt,
                                                  answer)
        if self.model is not None:
            from tailor.methods.reward import score

            learned = score(self.model, self.tokenizer, [p + [{"role": "assistant", "content": a}]
                                                         for p, a in zip(prompts, answers, strict=True)])
            scores = [s + self.weight * r for s, r in zip(scores, learned, strict=True)]
        return torch.tensor(scores)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(variance + 1e-8) * mask


class Policy(AnswerLogProbs):
    """The LoRA policy with a value head on its hidden states."""

    def __init__(self, model, temperature: float):
        super().__init__(model, temperature)
        self.value_head = torch.nn.Linear(self.model.get_base_model().config.hidden_size, 1,
                                          device=next(model.parameters()).device)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, sequences: torch.Tensor, mask: torch.Tensor, prompt_width: int):
        """Log-probabilities of the answer tokens, values and entropies, each [B, R]."""
        token_log_probs, states, entropy = super().forward(sequences, mask, prompt_width)
        # the value head reads detached states: its regression error must not reshape the policy's body (a shared
        # trunk with a fresh zero head wrecked small policies in a step or two)
        return token_log_probs, self.value_head(states.detach()).squeeze(-1), entropy


def advantages_and_returns(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                           lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al., 2016) over answer tokens, each [B, R]; positions after an answer's end count as 0."""
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    returns = advantages + values
    return masked_whiten(advantages, mask), returns


class ClippedPpoLoss(StepLoss):
    """PPO's clipped policy loss plus the weighted clipped value loss, summed over the answer tokens of a
    mini-batch of rollouts (the unit is an answer token). The value head is the objective's own parameter."""

    stats = ("policy_loss", "value_loss", "entropy", "clip_fraction")

    def __init__(self, policy: Policy, options: PpoOptions):
        super().__init__()
        self.policy, self.options = policy, options

    def forward(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o, m = self.options, batch["answer_mask"]
        log_probs, values, entropy = self.policy(batch["sequences"], batch["mask"], batch["width"])
        ratio = torch.exp(log_probs - batch["old"])
        unclipped = -batch["advantages"] * ratio
        clipped = -batch["advantages"] * ratio.clamp(1 - o.clip_range, 1 + o.clip_range)
        policy_loss = torch.maximum(unclipped, clipped)
        old_values, returns = batch["old_values"], batch["returns"]
        values_clipped = old_values + (values - old_values).clamp(-o.value_clip, o.value_clip)
        value_loss = 0.5 * torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2)
        return ((policy_loss + o.vf_coef * value_loss) * m).sum(), {
            "policy_loss": (policy_loss.detach() * m).sum(), "value_loss": (value_loss.detach() * m).sum(),
            "entropy": (entropy.detach() * m).sum(), "clip_fraction": ((clipped > unclipped).float() * m).sum()}


def run(config: TailorConfig, root: Path, run_dir: Path, *, show_progress: bool = True, should_stop=None,
        resume: bool = False, **_) -> TrainResult:
    options: PpoOptions = config.method_options("ppo")
    cfg = config.train
    root, run_dir = Path(root), Path(run_dir)
    prompts_file = prompts_path(options.prompts_file, root, run_dir, "methods.ppo.prompts_file")
    prompts = [messages for messages, _ in load_prompts(prompts_file)]
    base_ref = resolve_base_model(config.base_model, root=root)
    dtype = pick_dtype(cfg.dtype)
    seed_everything(cfg.seed)
    # the reward function is imported (and the reward model loaded) before the policy: a typo costs no model load
    scorer = Scorer(options, root)
    tokenizer = load_tokenizer(base_ref)
    model = load_policy(base_ref, dtype, options.init_adapter, root, "methods.ppo", options.lora)
    policy = Policy(model, options.temperature)
    steps_per_iteration = options.ppo_epochs * math.ceil(math.ceil(options.rollout_batch / options.mini_batch)
                                                         / cfg.grad_accum)

    def iteration(index: int) -> tuple[list[dict], dict]:
        batch_prompts = [prompts[i] for i in iteration_prompts(len(prompts), options.rollout_batch, cfg.seed, index)]
        sequences, mask, width, answer_mask, texts = rollout(model, tokenizer, batch_prompts, options.max_new_tokens,
                                                             options.temperature)
        scores = scorer(batch_prompts, texts).to(answer_mask.device)  # [B]
        with torch.no_grad():
            old_log_probs, old_values, _ = policy(sequences, mask, width)
            with reference(model):
                ref_log_probs, _, _ = policy(sequences, mask, width)
        kl = (old_log_probs - ref_log_probs) * answer_mask  # [B, R]
        rewards = -options.kl_coef * kl
        last_token = answer_mask.sum(dim=1).long().clamp(min=1) - 1
        rewards[torch.arange(len(texts)), last_token] += scores
        advantages, returns = advantages_and_returns(rewards, old_values, answer_mask, options.gamma, options.lam)
        model.train()
        batches = rollout_batches({"sequences": sequences, "mask": mask, "answer_mask": answer_mask,
                                   "advantages": advantages, "old": old_log_probs, "old_values": old_values,
                                   "returns": returns}, len(texts), options.mini_batch, options.ppo_epochs, width)
        return batches, {"reward": round(float(scores.mean()), 5), "kl": round(float(kl.sum(dim=1).mean()), 5),
                         "answer_tokens": round(float(answer_mask.sum(dim=1).mean()), 2)}

    return train_rollouts("ppo", config, run_dir, model, ClippedPpoLoss(policy, options),
                          steps_per_iteration=steps_per_iteration, iterations=options.iterations, iteration=iteration,
                          dtype=dtype, base_ref=base_ref, inputs=[prompts_file], resume=resume,
                          show_progress=show_progress, should_stop=should_stop)


register(Method(name="ppo", options=PpoOptions, run=run, artifact="adapter",
                summary="RLHF with PPO: sampled answers scored by a reward function and/or model, KL to a reference.",
                train_keys=ROLLOUT_TRAIN_KEYS))
