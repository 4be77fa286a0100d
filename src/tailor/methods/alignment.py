"""What the alignment methods (reward, dpo, kto, ppo, grpo) share: where their data and starting adapters come
from, tokenized preference pairs and their batches, the reference's log-probabilities, the policy with its frozen
reference, and writing the artifact and manifest like the training core does.

Not a method itself: listed in the registry's HELPER_MODULES.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from tailor.config import TailorConfig, dump_config
from tailor.errors import TailorError
from tailor.methods.kinds import ADAPTER
from tailor.methods.lora import LoraOptions
from tailor.methods.lora import prepare as add_lora
from tailor.models.base import load_model
from tailor.train.examples import Example, chat_ids, collate, tokenize_chat
from tailor.train.loop import autocast, sequence_log_probs
from tailor.workspace import atomic_dir, atomic_write_text, read_jsonl, update_manifest

PREFERENCE_FILE = "data/preferences.jsonl"  # where `tailor data build` and `tailor feedback export` put pairs
REFERENCE = "reference"  # name of the frozen copy of the starting adapter


def resolve_path(value: str, root: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(root) / path


def adapter_folder(value: str, root: Path, key: str) -> Path:
    """A run folder (its adapter/) or an adapter folder itself."""
    path = resolve_path(value, root)
    for folder in (ADAPTER.in_run(path), path):
        if ADAPTER.holds(folder):
            return folder
    raise TailorError(f"{key}: {path} holds no PEFT adapter (no {ADAPTER.marker} in it or in its {ADAPTER.folder}/ "
                      f"folder); name a run trained with lora, or its adapter folder")


def preference_pairs(option: str | None, root: Path, run_dir: Path, key: str, tokenizer=None,
                     max_tokens: int | None = None) -> tuple[list[dict], Path]:
    from tailor.data.preference import load_preference_file
    from tailor.train.examples import count_chat_tokens

    path = resolve_path(option, root) if option else Path(run_dir) / PREFERENCE_FILE
    if not path.is_file():
        raise TailorError(f"{key}: preference file {path} not found; name one (JSONL of prompt/chosen/rejected, "
                          f"HH, UltraFeedback or OpenAI preference records) or run `tailor feedback export`")
    counter = (lambda messages: count_chat_tokens(tokenizer, messages)) if tokenizer is not None else None
    return load_preference_file(path, count_tokens=counter, max_tokens=max_tokens), path


Item = TypeVar("Item")  # a preference pair, or (KTO) one rated answer


def split_pairs(pairs: list[Item], eval_fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """A seeded shuffle, then the last share held out (at least one pair when asked for and possible)."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = min(len(pairs) - 1, max(1, round(eval_fraction * len(pairs)))) if eval_fraction > 0 else 0
    train = [pairs[i] for i in order[:len(order) - held]]
    return train, [pairs[i] for i in order[len(order) - held:]]


@dataclass
class Pair:
    """A tokenized preference pair; `reference`: the starting policy's log-probabilities of (chosen, rejected)."""

    chosen: Example
    rejected: Example
    reference: tuple[float, float] = (0.0, 0.0)


def pair_items(pairs: list[dict], tokenizer, where: str) -> list[Pair]:
    from tailor.data.preference import with_answer

    def tokenized(i: int, pair: dict, side: str) -> Example:
        return tokenize_chat(tokenizer, with_answer(pair["prompt"], pair[side]), where=f"{where}: pair {i + 1}",
                             last_turn_only=True)

    return [Pair(tokenized(i, p, "chosen"), tokenized(i, p, "rejected")) for i, p in enumerate(pairs)]


def pair_lengths(items: list[Pair]) -> list[int]:
    return [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in items]


def collate_pairs(items: list[Pair], pad_id: int, device) -> dict:
    """One padded batch of the chosen rows, then the rejected rows [2 x pairs, longest]; a pair is the unit."""
    rows = [p.chosen for p in items] + [p.rejected for p in items]
    return collate(rows, pad_id, device) | {
        "units": len(items), "tokens": sum(len(e.input_ids) for e in rows),
        "reference": torch.tensor([p.reference[0] for p in items] + [p.reference[1] for p in items],
                                  dtype=torch.float32, device=device)}


@torch.no_grad()
def starting_log_probs(model, examples: list[Example], pad_id: int, batch_size: int,
                       compute_dtype: torch.dtype) -> list[float]:
    """log π(answer | prompt) of each example under the model as it is now, before the first step.

    DPO and KTO compare the policy with where it started: computed once here (TRL's precompute_ref_log_probs),
    no reference copy sits in memory beside the policy while it trains. A fresh LoRA starts equal to the base and
    an SFT adapter equal to itself, so this is the reference either way.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    values: list[float] = []
    for start in range(0, len(examples), batch_size):
        with autocast(model, compute_dtype):
            values += sequence_log_probs(model, collate(examples[start:start + batch_size], pad_id, device)).tolist()
    model.train(was_training)
    return values


def load_policy(base_ref: str, dtype: torch.dtype, init_adapter: str | None, root: Path, key: str,
                lora: LoraOptions, keep_reference: bool = True):
    """The policy: the starting adapter (an SFT run's) trainable as "default", plus (`keep_reference`) a frozen
    copy of it as the reference; or, without one, a fresh LoRA (`lora`) on the base, whose reference is the base
    with adapters disabled. Either way one set of base weights in memory. `key`: the method's options in
    tailor.yaml."""
    import peft

    base = load_model(base_ref, dtype=dtype)
    if init_adapter:
        folder = adapter_folder(init_adapter, root, f"{key}.init_adapter")
        model = peft.PeftModel.from_pretrained(base, str(folder), is_trainable=True)
        if keep_reference:
            model.load_adapter(str(folder), adapter_name=REFERENCE, is_trainable=False)
            model.set_adapter("default")
    else:
        model = add_lora(base, lora, f"{key}.lora")
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()  # weights that train stay fp32 for the optimizer
    return model


@contextlib.contextmanager
def reference(model) -> Iterator:
    """The frozen reference, for the block: the starting adapter's copy, or the base with adapters off."""
    if REFERENCE in model.peft_config:
        model.set_adapter(REFERENCE)
        try:
            yield model
        finally:
            model.set_adapter("default")
            for name, param in model.named_parameters():  # set_adapter re-enables grads only on the active one
                param.requires_grad_(".default." in name and "lora_" in name)
    else:
        with model.disable_adapter():
            yield model


def save_adapter(model, run_dir: Path, config: TailorConfig) -> Path:
    """RUN/adapter/: the trained "default" adapter only (a standard PEFT folder on the base) + the config."""
    target = ADAPTER.in_run(run_dir)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, selected_adapters=["default"])
        atomic_write_text(tmp / "tailor.yaml", dump_config(config))
    return target


def prompts_path(option: str | None, root: Path, run_dir: Path, key: str) -> Path:
    """The prompts a rollout method samples answers for: the named file, or RUN/data/train.jsonl."""
    path = resolve_path(option, root) if option else Path(run_dir) / "data" / "train.jsonl"
    if not path.is_file():
        raise TailorError(f"{key}: {path} not found; name a prompts file or run `tailor data build`")
    return path


def load_prompts(path: Path) -> list[tuple[list[dict], str | None]]:
    """Prompts and their reference answers (a final assistant turn, or "reference"; None without one) from chat
    `messages` or `prompt` records."""
    prompts = []
    for line_no, record in read_jsonl(path):
        messages = record.get("messages", record.get("prompt"))
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, list) or not messages:
            raise TailorError(f"{path}:{line_no}: expected chat \"messages\" or a \"prompt\"")
        reference = record.get("reference")
        while messages and messages[-1].get("role") == "assistant":
            reference = reference if reference is not None else messages[-1].get("content")
            messages = messages[:-1]
        if not messages or messages[-1].get("role") != "user":
            raise TailorError(f"{path}:{line_no}: the prompt must end with a user message")
        prompts.append((messages, reference))
    if not prompts:
        raise TailorError(f"{path}: no prompts")
    return prompts


class AnswerLogProbs(torch.nn.Module):
    """Log-probabilities of sampled answer tokens under the policy (PPO, GRPO); the output projection runs in fp32
    on answer positions only, so log-probabilities (and the clipped ratio) are not rounded to bf16."""

    def __init__(self, model, temperature: float):
        super().__init__()
        self.model, self.temperature = model, temperature
        base = model.get_base_model()
        self.decoder = base.get_decoder()
        # the output projection is frozen (LoRA does not touch it): one fp32 copy instead of a cast per forward
        self.head_weight = base.get_output_embeddings().weight.detach().float()

    def forward(self, sequences: torch.Tensor, mask: torch.Tensor, prompt_width: int):
        """Log-probabilities of the answer tokens [B, R], the states predicting them [B, R, H], entropies [B, R]."""
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: positions count real tokens only
        hidden = self.decoder(input_ids=sequences, attention_mask=mask,
                              position_ids=positions).last_hidden_state  # [B, P+R, H]
        states = hidden[:, prompt_width - 1:-1].float()  # [B, R, H]: the states that predict each answer token
        logits = states @ self.head_weight.T / self.temperature  # [B, R, V]
        log_probs = torch.log_softmax(logits, dim=-1)
        answer = sequences[:, prompt_width:]
        token_log_probs = log_probs.gather(-1, answer.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return token_log_probs, states, entropy


@torch.no_grad()
def rollout(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, temperature: float):
    """Sampled answers: sequences [B, P+R] (prompt left-padded), attention mask, prompt width, answer mask [B, R]."""
    device = next(model.parameters()).device
    encoded = [chat_ids(tokenizer, messages, add_generation_prompt=True) for messages in prompts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        prompt_mask[row, width - len(ids):] = 1
    model.eval()
    # top_k 0 and top_p 1: sample from the full distribution, the one whose log-probabilities PPO and GRPO use
    sequences = model.generate(input_ids=input_ids.to(device), attention_mask=prompt_mask.to(device),
                               do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                               max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    answer = sequences[:, width:]
    # an answer ends at its first end-of-sequence token (kept: the policy learns when to stop)
    ended = (answer == tokenizer.eos_token_id).long().cumsum(dim=1)
    answer_mask = ((ended == 0) | ((ended == 1) & (answer == tokenizer.eos_token_id))).long()
    mask = torch.cat([prompt_mask.to(device), answer_mask], dim=1)
    texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True).strip()
             for row, m in zip(answer, answer_mask, strict=True)]
    return sequences, mask, width, answer_mask.float(), texts


def iteration_prompts(count: int, per_iteration: int, seed: int, iteration: int) -> list[int]:
    """The prompts of an iteration: seeded passes over all prompts, the same for a given iteration on resume."""
    chosen: list[int] = []
    position = iteration * per_iteration
    while len(chosen) < per_iteration:
        epoch, offset = divmod(position, count)
        order = list(range(count))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        take = order[offset:offset + per_iteration - len(chosen)]
        chosen += take
        position += len(take)
    return chosen


def rollout_batches(rows: dict, count: int, mini_batch: int, epochs: int, width: int) -> list[dict]:
    """One iteration's micro-batches: `epochs` passes over its `count` rollouts, `mini_batch` at a time; `rows`
    holds per-rollout tensors [count, ...] (None for an absent one), including the attention `mask` and the
    `answer_mask`, whose tokens are the unit the loss is divided by."""
    batches = []
    for _ in range(epochs):
        for start in range(0, count, mini_batch):
            part = slice(start, start + mini_batch)
            batch: dict[str, Any] = {key: None if value is None else value[part] for key, value in rows.items()}
            batches.append(batch | {"width": width, "units": int(batch["answer_mask"].sum()),
                                    "tokens": int(batch["mask"].sum())})
    return batches


def train_rollouts(name: str, config: TailorConfig, run_dir: Path, model, objective, *, steps_per_iteration: int,
                   iterations: int, iteration, dtype: torch.dtype, base_ref: str, inputs: list[Path],
                   resume: bool, show_progress: bool, should_stop):
    """The loop of a rollout method (PPO, GRPO) on the core's Stepper: `iteration(i) -> (micro-batches, record)`
    samples and scores one batch of rollouts; its steps follow; checkpoints at iteration ends (the sampling RNG and
    the next iteration's prompts resume); the adapter and the manifest once every iteration ran."""
    from tailor.train.checkpoint import run_record
    from tailor.train.loop import Stepper

    cfg = config.train
    stepper = Stepper(model, objective, cfg, run_dir, iterations * steps_per_iteration, run=run_record(name, config),
                      resume=resume, show_progress=show_progress, description=name)
    first_reward = last = None
    stop_requested = False
    with stepper:
        while not stepper.done and not stop_requested:
            index = stepper.state.step // steps_per_iteration
            batches, record = iteration(index)
            record = {"iteration": index + 1, **record}
            first_reward = record["reward"] if first_reward is None else first_reward
            last, stop_requested = rollout_steps(stepper, batches, cfg.grad_accum, dtype, record,
                                                 lambda step: should_stop is not None and should_stop(step))
            if stop_requested or (cfg.save_every and (index + 1) % cfg.save_every == 0):
                stepper.checkpoint()
    stepper.finish()
    result = stepper.result(interrupted=not stepper.done)
    if result.interrupted:  # a checkpoint at the iteration's end to resume from, no artifact
        return result
    artifact = save_adapter(model, run_dir, config)
    record_training(run_dir, config, name, base_ref, dtype, inputs, artifact,
                    {**result.to_dict(), "first_reward": first_reward,
                     "last_reward": None if last is None else last.get("reward"),
                     "last_kl": None if last is None else last.get("kl")})
    return result


def rollout_steps(stepper, batches: list[dict], grad_accum: int, compute_dtype: torch.dtype, record: dict,
                  should_stop) -> tuple[dict, bool]:
    """Optimizer steps over one rollout batch's micro-batches (PPO, GRPO), grad_accum at a time, each step's summed
    loss divided by its units. Returns the last step's record and whether `should_stop(step)` asked to stop (the
    caller stops at the iteration's end, where a checkpoint can resume)."""
    objective, stop, logged = stepper.module.objective, False, {}
    for start in range(0, len(batches), grad_accum):
        group = batches[start:start + grad_accum]
        units = max(1, sum(batch["units"] for batch in group))
        total, sums = 0.0, dict.fromkeys(objective.stats, 0.0)
        for i, batch in enumerate(group):
            with autocast(stepper.module.model, compute_dtype):
                loss, stats = stepper.wrapped(batch)
            stepper.backward(loss / units, sync=i == len(group) - 1)
            total += float(loss.detach())
            for name in sums:
                sums[name] += float(stats[name])
        logged = stepper.step(total / units, tokens=sum(batch["tokens"] for batch in group), record=record)
        logged |= {name: round(value / units, 5) for name, value in sums.items()}
        stepper.log(logged)
        stop = should_stop(stepper.state.step) or stop
    return logged, stop


def record_training(run_dir: Path, config: TailorConfig, method: str, base_ref: str, dtype: torch.dtype,
                    inputs: list[Path], artifact: Path, metrics: dict) -> None:
    update_manifest(run_dir, "train", config=config.model_dump(mode="json"), inputs=inputs,
                    outputs=[artifact, Path(run_dir) / "metrics.jsonl"],
                    metrics={k: v for k, v in metrics.items() if v is not None},
                    extra={"method": method, "base_model": base_ref, "dtype": str(dtype)})
