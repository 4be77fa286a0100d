"""DPO: direct preference optimization (Rafailov et al., 2023) on the training core, LoRA or full weights.

No reward model and no sampling: the policy is pushed to raise the log-probability margin of chosen over rejected
answers relative to a reference, the policy as it started (an SFT run's adapter with `init_adapter`, else the base).
The reference's log-probabilities are computed once before the first step, so no second model is held in memory.
The loss variants and their formulas follow TRL's DPOTrainer. The artifact is the usual `RUN/adapter/` (or
`RUN/model/` for full), so `tailor eval` and `tailor serve` use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from tailor.config import TailorConfig, dump_config
from tailor.errors import TailorError
from tailor.methods.alignment import (
    Pair,
    collate_pairs,
    load_policy,
    pair_items,
    pair_lengths,
    preference_pairs,
    record_training,
    save_adapter,
    split_pairs,
    starting_log_probs,
)
from tailor.methods.lora import UsesLora
from tailor.methods.registry import PAIR_TRAIN_KEYS, Method, register
from tailor.models.base import load_model, load_tokenizer, pick_dtype, resolve_base_model
from tailor.train.checkpoint import run_record
from tailor.train.loop import Objective, TrainResult, seed_everything, sequence_log_probs, train
from tailor.workspace import atomic_dir, atomic_write_text


class DpoOptions(UsesLora):
    preference_file: str | None = Field(None, description=(
        "Preference pairs (JSONL: prompt/chosen/rejected, Anthropic HH, UltraFeedback or OpenAI preference "
        "records); null: RUN/data/preferences.jsonl."))
    init_adapter: str | None = Field(None, description=(
        "Start from this LoRA adapter (an SFT run folder or its adapter/ folder), which also serves as the frozen "
        "reference; null: a fresh adapter on the base (adapter: lora) or the base itself (adapter: full)."))
    adapter: Literal["lora", "full"] = Field("lora", description="Train LoRA adapters or every weight.")
    beta: float = Field(0.1, gt=0, description=(
        "Strength of the pull towards the reference: higher keeps the policy closer to it."))
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field("sigmoid", description=(
        "sigmoid: the DPO paper's loss; ipo: identity preference optimization; hinge: SLiC; robust: noisy labels."))
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Share of pairs held out for an eval loss.")
    max_tokens: int = Field(512, gt=8, description="Pairs whose prompt + answer exceed this are reported.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description=(
        "Assumed share of flipped preference labels (conservative DPO; with loss_type robust, the unbiased loss)."))


class DpoLoss(Objective):
    """The DPO loss of each pair from the policy's and the reference's log-probabilities of both answers."""

    stats = ("accuracy", "margin", "chosen_reward", "rejected_reward")

    def __init__(self, options: DpoOptions, pad_id: int):
        super().__init__()
        self.options, self.pad_id = options, pad_id

    def lengths(self, items: list[Pair]) -> list[int]:
        return pair_lengths(items)

    def collate(self, items: list[Pair], device) -> dict:
        return collate_pairs(items, self.pad_id, device)

    def forward(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n, beta, smoothing = batch["units"], self.options.beta, self.options.label_smoothing
        ratios = sequence_log_probs(model, batch) - batch["reference"]  # log π/π_ref of chosen rows, then rejected
        logits = ratios[:n] - ratios[n:]  # [pairs]
        kind = self.options.loss_type
        if kind == "sigmoid":
            losses = -F.logsigmoid(beta * logits) * (1 - smoothing) - F.logsigmoid(-beta * logits) * smoothing
        elif kind == "robust":
            losses = (-F.logsigmoid(beta * logits) * (1 - smoothing)
                      + F.logsigmoid(-beta * logits) * smoothing) / (1 - 2 * smoothing)
        elif kind == "hinge":
            losses = torch.relu(1 - beta * logits)
        else:  # ipo: the log-ratio margin regressed to 1/(2β)
            losses = (logits - 1 / (2 * beta)) ** 2
        rewards = (beta * ratios).detach()
        return losses.sum(), {"accuracy": (logits > 0).sum().detach(), "margin": rewards[:n].sum() - rewards[n:].sum(),
                              "chosen_reward": rewards[:n].sum(), "rejected_reward": rewards[n:].sum()}


def policy(base_ref: str, dtype: torch.dtype, options: DpoOptions, root: Path):
    """The model to train: an adapter (the SFT run's, or fresh) on the base stored in `dtype`, or every weight."""
    if options.adapter == "full":
        if options.init_adapter:
            raise TailorError("methods.dpo.init_adapter: an adapter start needs methods.dpo.adapter: lora (to start "
                              "a full fine-tune from an SFT run, set base_model to its merged export)")
        model = load_model(base_ref, dtype=torch.float32)
        return model.requires_grad_(True)
    return load_policy(base_ref, dtype, options.init_adapter, root, "methods.dpo", options.lora,
                       keep_reference=False)


def with_reference(model, items: list[Pair], pad_id: int, batch_size: int, dtype: torch.dtype) -> list[Pair]:
    """The pairs with the starting policy's log-probabilities of both answers."""
    rows = [p.chosen for p in items] + [p.rejected for p in items]
    values = starting_log_probs(model, rows, pad_id, batch_size, dtype)
    return [Pair(p.chosen, p.rejected, (values[i], values[len(items) + i])) for i, p in enumerate(items)]


def run(config: TailorConfig, root: Path, run_dir: Path, *, show_progress: bool = True, should_stop=None,
        resume: bool = False, **_) -> TrainResult:
    options: DpoOptions = config.method_options("dpo")
    cfg = config.train
    run_dir = Path(run_dir)
    base_ref = resolve_base_model(config.base_model, root=root)
    tokenizer = load_tokenizer(base_ref)
    pairs, source = preference_pairs(options.preference_file, root, run_dir, "methods.dpo.preference_file",
                                     tokenizer, options.max_tokens)
    train_pairs, eval_pairs = split_pairs(pairs, options.eval_fraction, cfg.seed)
    dtype = pick_dtype(cfg.dtype)
    seed_everything(cfg.seed)
    model = policy(base_ref, dtype, options, root)
    pad_id = tokenizer.pad_token_id
    items = with_reference(model, pair_items(train_pairs, tokenizer, str(source)), pad_id, cfg.batch_size, dtype)
    eval_items = with_reference(model, pair_items(eval_pairs, tokenizer, str(source)), pad_id, cfg.batch_size,
                                dtype)
    result = train(model, items, eval_items, cfg, run_dir, objective=DpoLoss(options, pad_id), compute_dtype=dtype,
                   resume=resume, show_progress=show_progress, should_stop=should_stop,
                   run=run_record("dpo", config), description="dpo")
    if result.interrupted:  # a checkpoint to resume from, no artifact
        return result
    if options.adapter == "lora":
        artifact = save_adapter(model, run_dir, config)
    else:
        artifact = run_dir / "model"
        with atomic_dir(artifact) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_text(tmp / "tailor.yaml", dump_config(config))
    record_training(run_dir, config, "dpo", base_ref, dtype, [source], artifact,
                    result.to_dict())
    return result


register(Method(name="dpo", options=DpoOptions, run=run, artifact="adapter",
                artifact_for=lambda options: "adapter" if options.adapter == "lora" else "model",
                summary="Direct preference optimization on preference pairs, LoRA or full weights.",
                train_keys=PAIR_TRAIN_KEYS))
