"""Reward model: the base model with a scalar head, trained on preference pairs so that the chosen answer scores
higher than the rejected one — the pairwise loss −log σ(r_chosen − r_rejected) of Ouyang et al. (2022).

The reward is the head applied to the hidden state of the conversation's last token. The body trains as LoRA
(default) or fully. The artifact `RUN/reward/` holds the adapter (or the whole model), `head.safetensors` and
`reward.json`; PPO and `tailor reward score` load it with `load_reward_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from tailor.config import TailorConfig, dump_config
from tailor.errors import TailorError
from tailor.methods.alignment import (
    Pair,
    collate_pairs,
    pair_items,
    pair_lengths,
    preference_pairs,
    record_training,
    split_pairs,
)
from tailor.methods.kinds import REWARD
from tailor.methods.lora import UsesLora
from tailor.methods.lora import prepare as add_lora
from tailor.methods.registry import PAIR_TRAIN_KEYS, Method, register
from tailor.models.base import load_model, load_tokenizer, pick_dtype, resolve_base_model
from tailor.train.checkpoint import run_record
from tailor.train.examples import chat_ids
from tailor.train.loop import Objective, TrainResult, seed_everything, train
from tailor.workspace import atomic_dir, atomic_write_text, read_json, write_json

REWARD_DIR = REWARD.folder
HEAD_FILE = "head.safetensors"
INFO_FILE = REWARD.marker


class RewardOptions(UsesLora):
    # a scalar head needs less than a generator: a smaller rank on the attention projections only
    lora_defaults = {"r": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}

    preference_file: str | None = Field(None, description=(
        "Preference pairs (JSONL: prompt/chosen/rejected, Anthropic HH, UltraFeedback or OpenAI preference "
        "records); null: RUN/data/preferences.jsonl."))
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="Share of pairs held out to report pair accuracy.")
    adapter: Literal["lora", "full"] = Field("lora", description="Train the body as LoRA adapters or fully.")
    max_tokens: int = Field(512, gt=8, description="Pairs whose prompt + answer exceed this are reported.")


def last_token_rewards(body, head: torch.nn.Linear, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
    """The head on the hidden state of each row's last real token (right padding) [B]."""
    model = body.get_base_model() if hasattr(body, "get_base_model") else body
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B,T,H]
    last = attention_mask.sum(dim=1) - 1
    return head(hidden[torch.arange(hidden.shape[0]), last].float()).squeeze(-1)


class RewardModel(torch.nn.Module):
    """A causal LM body (optionally with LoRA) and a linear head on the last real token's hidden state."""

    def __init__(self, body, head: torch.nn.Linear):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return last_token_rewards(self.body, self.head, input_ids, attention_mask)


class PairwiseLoss(Objective):
    """−log σ(r_chosen − r_rejected) summed over pairs; the head is the objective's own parameter, so it trains
    and is checkpointed with the body's LoRA weights."""

    stats = ("accuracy", "margin")

    def __init__(self, head: torch.nn.Linear, pad_id: int):
        super().__init__()
        self.head, self.pad_id = head, pad_id

    def lengths(self, items: list[Pair]) -> list[int]:
        return pair_lengths(items)

    def collate(self, items: list[Pair], device) -> dict:
        return collate_pairs(items, self.pad_id, device)

    def forward(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rewards = last_token_rewards(model, self.head, batch["input_ids"], batch["attention_mask"])
        n = batch["units"]
        margin = rewards[:n] - rewards[n:]  # [pairs]
        return (-torch.nn.functional.logsigmoid(margin).sum(),
                {"accuracy": (margin > 0).sum().detach(), "margin": margin.sum().detach()})


def batch_ids(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention_mask, each [batch, longest]."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
    return input_ids.to(device), attention_mask.to(device)


def build(base_ref: str, dtype: torch.dtype, options: RewardOptions) -> RewardModel:
    model = load_model(base_ref, dtype=dtype if options.adapter == "lora" else torch.float32)
    if options.adapter == "lora":
        model = add_lora(model, options.lora, "methods.reward.lora")
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    else:
        model.requires_grad_(True)
    # zero init: every answer starts at reward 0, so the first steps learn the preference, not undo noise
    head = torch.nn.Linear(model.config.hidden_size, 1).to(next(model.parameters()).device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return RewardModel(model, head)


def run(config: TailorConfig, root: Path, run_dir: Path, *, show_progress: bool = True, should_stop=None,
        resume: bool = False, **_) -> TrainResult:
    options: RewardOptions = config.method_options("reward")
    cfg = config.train
    base_ref = resolve_base_model(config.base_model, root=root)
    tokenizer = load_tokenizer(base_ref)
    pairs, source = preference_pairs(options.preference_file, root, run_dir, "methods.reward.preference_file",
                                     tokenizer, options.max_tokens)
    train_pairs, eval_pairs = split_pairs(pairs, options.eval_fraction, cfg.seed)
    dtype = pick_dtype(cfg.dtype)
    seed_everything(cfg.seed)
    model = build(base_ref, dtype, options)
    result = train(model.body, pair_items(train_pairs, tokenizer, str(source)),
                   pair_items(eval_pairs, tokenizer, str(source)), cfg, run_dir,
                   objective=PairwiseLoss(model.head, tokenizer.pad_token_id), compute_dtype=dtype, resume=resume,
                   show_progress=show_progress, should_stop=should_stop, run=run_record("reward", config),
                   description="reward model")
    if result.interrupted:  # a checkpoint to resume from, no artifact
        return result
    accuracy = result.eval_stats.get("accuracy")
    artifact = save(model, tokenizer, run_dir, config, base_ref,
                    {"pair_accuracy": accuracy, "eval_pairs": len(eval_pairs), "train_pairs": len(train_pairs)})
    record_training(run_dir, config, "reward", base_ref, dtype, [source], artifact,
                    {**result.to_dict(), "pair_accuracy": accuracy})
    return result


def save(model: RewardModel, tokenizer, run_dir: Path, config: TailorConfig, base_ref: str, info: dict) -> Path:
    target = Path(run_dir) / REWARD_DIR
    options: RewardOptions = config.method_options("reward")
    with atomic_dir(target) as tmp:
        model.body.save_pretrained(tmp)
        if options.adapter == "full":
            tokenizer.save_pretrained(tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, tmp / HEAD_FILE)
        write_json(tmp / INFO_FILE, {"base_model": base_ref, "adapter": options.adapter, **info})
        atomic_write_text(tmp / "tailor.yaml", dump_config(config))
    return target


def reward_folder(value: str | Path, root: Path | None = None, key: str = "reward model") -> Path:
    """A reward run folder (its reward/) or the reward folder itself."""
    path = Path(value).expanduser()
    if root is not None and not path.is_absolute():
        path = Path(root) / path
    for folder in (path / REWARD_DIR, path):
        if (folder / INFO_FILE).is_file() and (folder / HEAD_FILE).is_file():
            return folder
    raise TailorError(f"{key}: {path} is not a reward model (no {INFO_FILE} and {HEAD_FILE}); train one with "
                      f"`tailor train --method reward`")


def load_reward_model(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[RewardModel, object]:
    """The reward model of a `reward/` folder and its tokenizer, in eval mode."""
    info = read_json(folder / INFO_FILE)
    if info.get("adapter") == "full":
        body, tokenizer = load_model(str(folder), dtype=dtype), load_tokenizer(str(folder))
    else:
        import peft

        body = peft.PeftModel.from_pretrained(load_model(info["base_model"], dtype=dtype), str(folder))
        tokenizer = load_tokenizer(info["base_model"])
    state = load_file(folder / HEAD_FILE)
    head = torch.nn.Linear(state["weight"].shape[1], 1)
    head.load_state_dict(state)
    model = RewardModel(body, head.to(next(body.parameters()).device)).eval()
    model.requires_grad_(False)
    return model, tokenizer


@torch.no_grad()
def score(model: RewardModel, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
    """The reward of each conversation's final assistant answer."""
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(conversations), batch_size):
        sequences = [chat_ids(tokenizer, c) for c in conversations[start:start + batch_size]]
        scores += model(*batch_ids(sequences, tokenizer.pad_token_id, device)).tolist()
    return scores


register(Method(name="reward", options=RewardOptions, run=run, artifact="reward",
                summary="Reward model: a scalar head on the base (LoRA or full) trained on preference pairs.",
                train_keys=PAIR_TRAIN_KEYS))
