"""GRPO: group-relative policy optimization (Shao et al., 2024, DeepSeekMath; as in TRL's GRPOTrainer).

No value model: each prompt is answered `group_size` times, the graders score every answer, and an answer's
advantage is its score minus its group's mean (divided by the group's standard deviation with `scale_rewards`).
The loss is PPO's clipped ratio on every answer token plus β · KL(π ‖ π_ref) by the k3 estimator, averaged over the
answer tokens of the whole step (DAPO's token-level normalization, TRL's default). Graders follow OpenAI's
reinforcement fine-tuning: string checks and text similarity against a reference answer, a Python function, a
reward model's score, and weighted combinations (graders.py).

The policy is LoRA, on an SFT run's adapter (whose frozen copy is the reference) or fresh on the base; the
artifact is the usual `RUN/adapter/`. Steps go through the training core's Stepper (clipping, warm-up and decay,
metrics, checkpoints at iteration ends, resume).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from pydantic import Field

from tailor.config import TailorConfig
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
from tailor.methods.graders import Graders, GraderSpec
from tailor.methods.lora import UsesLora
from tailor.methods.registry import ROLLOUT_TRAIN_KEYS, Method, register
from tailor.models.base import load_tokenizer, pick_dtype, resolve_base_model
from tailor.train.loop import StepLoss, TrainResult, seed_everything


class GrpoOptions(UsesLora):
    graders: list[GraderSpec] = Field(default_factory=list, description=(
        "What scores an answer, averaged by weight: {type: string_check, operation: eq|ne|like|ilike, reference}, "
        "{type: text_similarity, metric: token_f1|rouge_l|bleu|fuzzy_match}, {type: python, function: "
        "module:function}, {type: score_model, model: REWARD_RUN}; each with an optional name and weight."))
    init_adapter: str | None = Field(None, description=(
        "Start from this LoRA adapter (an SFT run folder or its adapter/ folder); its frozen copy is the KL "
        "reference. null: a fresh adapter on the base, whose reference is the base."))
    prompts_file: str | None = Field(None, description=(
        "JSONL of prompts (chat `messages` or `prompt`); a final assistant turn or a \"reference\" is the "
        "reference answer graders compare with. null: RUN/data/train.jsonl."))
    iterations: int = Field(20, gt=0, description="Rollout batches (each followed by `epochs` passes of updates).")
    prompts_per_iteration: int = Field(4, gt=0, description="Prompts sampled per iteration.")
    group_size: int = Field(4, gt=1, description="Answers sampled per prompt (the group advantages compare).")
    mini_batch: int = Field(8, gt=0, description="Answers per micro-batch (train.grad_accum of them per step).")
    epochs: int = Field(1, gt=0, description="Passes over each rollout batch (μ); above 1 the ratio is clipped "
                                             "against the sampling policy.")
    max_new_tokens: int = Field(48, gt=0, description="Longest sampled answer.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    beta: float = Field(0.04, ge=0, description="Weight of the KL penalty against the reference (0: none).")
    epsilon: float = Field(0.2, gt=0, description="Clip ε of the policy ratio.")
    scale_rewards: bool = Field(True, description=(
        "Divide advantages by the group's standard deviation (GRPO); false: only subtract the mean (Dr. GRPO)."))


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool) -> torch.Tensor:
    """Each score minus its group's mean (and over its standard deviation); groups are consecutive [G] runs."""
    groups = scores.view(-1, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + 1e-4)
    return advantages.reshape(-1)


class ClippedGroupLoss(StepLoss):
    """Summed per-token loss of a mini-batch of sampled answers; the unit is an answer token."""

    stats = ("kl", "clip_fraction")

    def __init__(self, log_probs: AnswerLogProbs, options: GrpoOptions):
        super().__init__()
        self.log_probs, self.options = log_probs, options

    def forward(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = self.options
        log_probs, _, _ = self.log_probs(batch["sequences"], batch["mask"], batch["width"])
        m = batch["answer_mask"]
        old = batch["old"] if batch["old"] is not None else log_probs.detach()
        ratio = torch.exp(log_probs - old)
        advantages = batch["advantages"][:, None]
        unclipped = ratio * advantages
        clipped = ratio.clamp(1 - o.epsilon, 1 + o.epsilon) * advantages
        per_token = -torch.minimum(unclipped, clipped)
        delta = batch["reference"] - log_probs
        kl = torch.exp(delta) - delta - 1  # k3: unbiased, never negative
        if o.beta:
            per_token = per_token + o.beta * kl
        return (per_token * m).sum(), {"kl": (kl.detach() * m).sum(),
                                       "clip_fraction": ((clipped < unclipped).float() * m).sum()}


def run(config: TailorConfig, root: Path, run_dir: Path, *, show_progress: bool = True, should_stop=None,
        resume: bool = False, **_) -> TrainResult:
    options: GrpoOptions = config.method_options("grpo")
    cfg = config.train
    root, run_dir = Path(root), Path(run_dir)
    prompts_file = prompts_path(options.prompts_file, root, run_dir, "methods.grpo.prompts_file")
    prompts = load_prompts(prompts_file)
    # graders load (user code imported, reward model read) before the policy: a typo costs no model load
    graders = Graders(options.graders, root, "methods.grpo.graders")
    base_ref = resolve_base_model(config.base_model, root=root)
    dtype = pick_dtype(cfg.dtype)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(base_ref)
    model = load_policy(base_ref, dtype, options.init_adapter, root, "methods.grpo", options.lora)
    log_probs = AnswerLogProbs(model, options.temperature)
    answers = options.prompts_per_iteration * options.group_size
    steps_per_iteration = options.epochs * math.ceil(math.ceil(answers / options.mini_batch) / cfg.grad_accum)

    def iteration(index: int) -> tuple[list[dict], dict]:
        chosen = [prompts[i] for i in iteration_prompts(len(prompts), options.prompts_per_iteration, cfg.seed, index)]
        group_prompts = [messages for messages, _ in chosen for _ in range(options.group_size)]
        references = [ref for _, ref in chosen for _ in range(options.group_size)]
        sequences, mask, width, answer_mask, texts = rollout(model, tokenizer, group_prompts, options.max_new_tokens,
                                                             options.temperature)
        combined, each = graders(group_prompts, texts, references)
        scores = torch.tensor(combined)
        advantages = group_advantages(scores, options.group_size, options.scale_rewards).to(answer_mask.device)
        with torch.no_grad():
            old = log_probs(sequences, mask, width)[0] if options.epochs > 1 else None
            with reference(model):
                ref = log_probs(sequences, mask, width)[0]
        model.train()
        batches = rollout_batches({"sequences": sequences, "mask": mask, "answer_mask": answer_mask,
                                   "advantages": advantages, "old": old, "reference": ref}, len(texts),
                                  options.mini_batch, options.epochs, width)
        return batches, {"reward": round(float(scores.mean()), 5),
                         "reward_std": round(float(scores.view(-1, options.group_size).std(dim=1).mean()), 5),
                         **{f"reward/{name}": round(sum(values) / len(values), 5) for name, values in each.items()},
                         "answer_tokens": round(float(answer_mask.sum(dim=1).mean()), 2)}

    return train_rollouts("grpo", config, run_dir, model, ClippedGroupLoss(log_probs, options),
                          steps_per_iteration=steps_per_iteration, iterations=options.iterations, iteration=iteration,
                          dtype=dtype, base_ref=base_ref, inputs=[prompts_file], resume=resume,
                          show_progress=show_progress, should_stop=should_stop)


register(Method(name="grpo", options=GrpoOptions, run=run, artifact="adapter",
                summary="Group-relative policy optimization: answers sampled in groups, scored by graders "
                        "(string, similarity, Python, reward model), LoRA.",
                train_keys=ROLLOUT_TRAIN_KEYS))
