"""KTO: Kahneman–Tversky optimization (Ethayarajh et al., 2024) on unpaired thumbs-up and thumbs-down answers.

What the chat page collects is a rating of one answer, not a pair: KTO learns from exactly that. Each answer's
implied reward is β·log(π/π_ref); a desirable answer's loss is 1 − σ(reward − z) and an undesirable one's
1 − σ(z − reward), where z is a detached estimate of KL(π ‖ π_ref) from the same prompts paired with other answers
(the paper's and TRL's mismatched pairs). As for DPO, the reference is the policy as it started, its
log-probabilities computed once before the first step. The artifact is the usual `RUN/adapter/`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field

from tailor.config import TailorConfig
from tailor.errors import TailorError
from tailor.methods.alignment import (
    load_policy,
    record_training,
    resolve_path,
    save_adapter,
    split_pairs,
    starting_log_probs,
)
from tailor.methods.lora import UsesLora
from tailor.methods.registry import PAIR_TRAIN_KEYS, Method, register
from tailor.models.base import load_tokenizer, pick_dtype, resolve_base_model
from tailor.train.checkpoint import run_record
from tailor.train.examples import Example, collate, tokenize_chat
from tailor.train.loop import Objective, TrainResult, seed_everything, sequence_log_probs, train
from tailor.workspace import read_jsonl

EXAMPLES_FILE = "data/unpaired.jsonl"


class KtoOptions(UsesLora):
    examples_file: str | None = Field(None, description=(
        "Rated answers: the server's feedback database (SQLite), JSONL feedback records (prompt, answer, rating "
        "up/down, correction) or TRL's unpaired records (prompt, completion, label true/false); "
        f"null: RUN/{EXAMPLES_FILE}."))
    init_adapter: str | None = Field(None, description=(
        "Start from this LoRA adapter (an SFT run folder or its adapter/ folder), which is also the reference; "
        "null: a fresh adapter on the base."))
    beta: float = Field(0.1, gt=0, description="Scale of the implied reward; higher keeps the policy closer to "
                                               "the reference.")
    desirable_weight: float = Field(1.0, gt=0, description=(
        "Weight of desirable answers' losses; the paper advises desirable_weight × #desirable ÷ "
        "(undesirable_weight × #undesirable) between 1 and 4/3."))
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of undesirable answers' losses.")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Share of examples held out for an eval loss.")
    max_tokens: int = Field(512, gt=8, description="Examples whose prompt + answer exceed this stop the run.")


@dataclass
class Rated:
    """A rated answer, tokenized, with the same prompt answered by another example (the KL estimate's sample);
    `reference`: the starting policy's log-probabilities of both."""

    example: Example
    mismatched: Example
    desirable: bool
    reference: tuple[float, float] = (0.0, 0.0)


def _messages(value, where: str, what: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user" if what == "prompt" else "assistant", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in value):
        return value
    raise TailorError(f"{where}: \"{what}\" must be a text or a list of chat messages")


def load_examples(path: Path) -> list[dict]:
    """`{prompt: [messages], completion: str, label: bool}` from a feedback database or a JSONL file of feedback
    or unpaired records (the format is recognized per line from its keys)."""
    from tailor.feedback.export import check_record, load_feedback, to_unpaired

    if path.suffix.lower() not in (".jsonl", ".json"):
        return to_unpaired(load_feedback(path))
    examples = []
    for line_no, record in read_jsonl(path):
        where = f"{path}:{line_no}"
        if "label" in record:
            if not isinstance(record["label"], bool):
                raise TailorError(f"{where}: \"label\" must be true (desirable) or false (undesirable)")
            completion = _messages(record.get("completion"), where, "completion")
            examples.append({"prompt": _messages(record.get("prompt"), where, "prompt"),
                             "completion": completion[-1]["content"], "label": record["label"]})
        elif "rating" in record:
            examples += to_unpaired([check_record(record, where)])
        else:
            raise TailorError(f"{where}: expected an unpaired record (prompt, completion, label) or a feedback "
                              f"record (prompt, answer, rating)")
    return examples


def rated_items(examples: list[dict], tokenizer, where: str, max_tokens: int, seed: int) -> list[Rated]:
    """Tokenized, each prompt also paired with the next example's answer in a seeded order (never its own)."""
    def encode(prompt, completion, index):
        example = tokenize_chat(tokenizer, [*prompt, {"role": "assistant", "content": completion}],
                                where=f"{where}: example {index + 1}", last_turn_only=True)
        if len(example.input_ids) > max_tokens:
            raise TailorError(f"{where}: example {index + 1} has {len(example.input_ids)} tokens, more than "
                              f"max_tokens {max_tokens}")
        return example

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    partner = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    return [Rated(encode(e["prompt"], e["completion"], i),
                  encode(e["prompt"], examples[partner[i]]["completion"], i), e["label"])
            for i, e in enumerate(examples)]


class KtoLoss(Objective):
    stats = ("kl", "accuracy")

    def __init__(self, options: KtoOptions, pad_id: int):
        super().__init__()
        self.options, self.pad_id = options, pad_id

    def lengths(self, items: list[Rated]) -> list[int]:
        return [max(len(r.example.input_ids), len(r.mismatched.input_ids)) for r in items]

    def collate(self, items: list[Rated], device) -> dict:
        return {"matched": collate([r.example for r in items], self.pad_id, device),
                "mismatched": collate([r.mismatched for r in items], self.pad_id, device),
                "reference": torch.tensor([r.reference for r in items], dtype=torch.float32, device=device),
                "desirable": torch.tensor([r.desirable for r in items], device=device),
                "units": len(items), "tokens": sum(len(r.example.input_ids) for r in items)}

    def forward(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = self.options
        ratio = sequence_log_probs(model, batch["matched"]) - batch["reference"][:, 0]  # log π/π_ref [B]
        with torch.no_grad():  # the KL estimate z is a baseline: no gradient flows through it
            mismatched = sequence_log_probs(model, batch["mismatched"]) - batch["reference"][:, 1]
            kl = mismatched.mean().clamp(min=0)
        desirable = batch["desirable"]
        losses = torch.where(desirable, o.desirable_weight * (1 - torch.sigmoid(o.beta * (ratio - kl))),
                             o.undesirable_weight * (1 - torch.sigmoid(o.beta * (kl - ratio))))
        return losses.sum(), {"kl": kl * len(ratio), "accuracy": ((ratio > 0) == desirable).sum().detach()}


def with_reference(model, items: list[Rated], pad_id: int, batch_size: int, dtype: torch.dtype) -> list[Rated]:
    values = starting_log_probs(model, [r.example for r in items] + [r.mismatched for r in items], pad_id,
                                batch_size, dtype)
    return [Rated(r.example, r.mismatched, r.desirable, (values[i], values[len(items) + i]))
            for i, r in enumerate(items)]


def run(config: TailorConfig, root: Path, run_dir: Path, *, show_progress: bool = True, should_stop=None,
        resume: bool = False, **_) -> TrainResult:
    options: KtoOptions = config.method_options("kto")
    cfg = config.train
    run_dir = Path(run_dir)
    path = resolve_path(options.examples_file, root) if options.examples_file else run_dir / EXAMPLES_FILE
    if not path.is_file():
        raise TailorError(f"methods.kto.examples_file: {path} not found; name the server's feedback database or "
                          f"a JSONL of rated answers")
    examples = load_examples(path)
    if len(examples) < 2:
        raise TailorError(f"methods.kto.examples_file: {path} holds {len(examples)} rated answer(s); KTO needs at "
                          f"least 2 (each prompt is also paired with another example's answer)")
    base_ref = resolve_base_model(config.base_model, root=root)
    tokenizer = load_tokenizer(base_ref)
    items = rated_items(examples, tokenizer, str(path), options.max_tokens, cfg.seed)
    train_items, eval_items = split_pairs(items, options.eval_fraction, cfg.seed)
    dtype = pick_dtype(cfg.dtype)
    seed_everything(cfg.seed)
    model = load_policy(base_ref, dtype, options.init_adapter, root, "methods.kto", options.lora,
                        keep_reference=False)
    pad_id = tokenizer.pad_token_id
    result = train(model, with_reference(model, train_items, pad_id, cfg.batch_size, dtype),
                   with_reference(model, eval_items, pad_id, cfg.batch_size, dtype), cfg, run_dir,
                   objective=KtoLoss(options, pad_id), compute_dtype=dtype, resume=resume,
                   show_progress=show_progress, should_stop=should_stop, run=run_record("kto", config),
                   description="kto")
    if result.interrupted:  # a checkpoint to resume from, no artifact
        return result
    artifact = save_adapter(model, run_dir, config)
    desirable = sum(r.desirable for r in train_items)
    record_training(run_dir, config, "kto", base_ref, dtype, [path], artifact,
                    {**result.to_dict(), "desirable": desirable, "undesirable": len(train_items) - desirable})
    return result


register(Method(name="kto", options=KtoOptions, run=run, artifact="adapter",
                summary="Kahneman–Tversky optimization on unpaired thumbs-up/down answers (the chat page's "
                        "feedback), LoRA.",
                train_keys=PAIR_TRAIN_KEYS))
