"""The one training core every trained method uses: one explicit loop, no framework hiding the steps.

Gradient accumulation, clipping, warmup + decay, periodic eval loss, checkpoint/resume and metrics.jsonl live here
once, so a fix lands for every method. What makes it fast on a CPU: examples packed into rows (no padding; see
packing.py), the output projection applied to answer tokens only and in chunks (the [tokens x vocabulary] logits
never exist), frozen base weights stored in bf16. accelerate runs the same loop data-parallel (distributed.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute
from transformers import get_scheduler

from tailor.config import TrainConfig
from tailor.errors import TailorError
from tailor.train import checkpoint, trackers
from tailor.train.distributed import LossFn, LossModule, make_accelerator
from tailor.train.examples import IGNORE, Example, collate, epoch_batches
from tailor.train.packing import pack
from tailor.train.progress import TrainProgress

# logits held at once by the chunked cross-entropy: 2^25 fp32 values = 128 MB, e.g. 682 tokens x 49,152 words
CHUNK_LOGITS = 2**25


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    eval_loss: float | None
    label_tokens: int  # tokens the loss was computed on
    tokens: int  # all real (non-padding) tokens processed
    seconds: float
    tokens_per_s: float
    trainable_params: int
    stopped_early: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def autocast(model, dtype: torch.dtype):
    """Autocast only when weights are stored wider than the compute dtype (e.g. fp32 weights of a full fine-tune).

    When the frozen base is already stored in bf16, autocast only adds per-op casts: measured on this CPU it made
    greedy decoding 1.7x slower than plain bf16 weights.
    """
    stored = model.get_input_embeddings().weight.dtype
    if dtype == stored or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=next(model.parameters()).device.type, dtype=dtype)


def _decoder_and_head(model):
    """The transformer body and the output projection, with any PEFT layers still in place."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if uses_virtual_tokens(model):
        return None, None  # virtual tokens are added by PeftModel.forward: no shortcut
    return base.get_decoder(), base.get_output_embeddings()


def uses_virtual_tokens(model) -> bool:
    """Prompt tuning, p-tuning and prefix tuning add virtual tokens to every row inside PeftModel.forward."""
    peft_config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    return peft_config is not None and getattr(peft_config, "is_prompt_learning", False)


def model_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """What the model's forward takes from a batch: a padded batch has an attention mask; a packed one has none and
    its position ids restart at every example (transformers then builds the block-diagonal mask)."""
    if batch.get("attention_mask") is not None:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}


def _linear_cross_entropy(hidden, weight, targets, chunk, want_hidden, want_weight):
    """Summed cross-entropy of `hidden @ weight.T` against `targets` and, if wanted, its gradients with respect to
    hidden and weight, one chunk of tokens at a time: at most [chunk x vocabulary] logits exist at once."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]  # [c, H], [c]
        logits = F.linear(h, weight).float()  # [c, V], fp32 for a stable softmax
        log_norm = torch.logsumexp(logits, dim=-1)  # [c]
        total += (log_norm - logits.gather(1, t[:, None]).squeeze(1)).sum()
        if want_hidden or want_weight:
            grad_logits = logits.sub_(log_norm[:, None]).exp_()  # d(sum CE)/d logits = softmax - one_hot(target)
            grad_logits[torch.arange(len(t), device=t.device), t] -= 1
            grad_logits = grad_logits.to(weight.dtype)
            if want_hidden:
                grad_hidden[start:start + chunk] = grad_logits @ weight  # [c, H]
            if want_weight:
                grad_weight += (grad_logits.T @ h.to(weight.dtype)).float()  # [V, H]
    return total, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    """The gradients are computed in the forward pass, chunk by chunk, and only scaled in backward, so the
    [tokens x vocabulary] logits exist neither forward nor backward. Written here because the libraries that do
    this (Liger's fused linear cross-entropy, Cut Cross-Entropy) ship GPU-only Triton kernels."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        total, grad_hidden, grad_weight = _linear_cross_entropy(hidden, weight, targets, chunk,
                                                                *ctx.needs_input_grad[:2])
        ctx.grads = (grad_hidden, grad_weight)  # not inputs or outputs: plain attributes are safe
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        return (None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype), None, None)


def chunked_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of cross-entropy(head(hidden), targets), holding at most CHUNK_LOGITS logits at a time.
    hidden [N, H], targets [N]."""
    chunk = max(1, CHUNK_LOGITS // head.weight.shape[0])
    if type(head) is torch.nn.Linear and head.bias is None:
        if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
            return _LinearCrossEntropy.apply(hidden, head.weight, targets, chunk)
        return _linear_cross_entropy(hidden, head.weight, targets, chunk, False, False)[0]

    # a head adapted by PEFT (or with a bias): recompute each chunk's logits in backward instead of keeping them
    def chunk_loss(h, t):
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        total = total + (recompute(chunk_loss, h, t, use_reentrant=False) if torch.is_grad_enabled()
                         else chunk_loss(h, t))
    return total


def loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over label tokens, and their count (the caller normalizes).

    Only label positions go through the output projection: on chat data most tokens are prompt, and the
    [tokens x vocabulary] logits of those would be computed only to be thrown away.
    """
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE  # [B, T-1]
    decoder, head = _decoder_and_head(model)
    if decoder is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # prompt and p-tuning prepend their virtual tokens to the sequence: keep the input's own positions
        logits = logits[:, -batch["input_ids"].shape[1]:]  # [B, T, V]
        loss = F.cross_entropy(logits[:, :-1][mask].float(), labels[mask], reduction="sum")
    else:
        hidden = decoder(**model_inputs(batch), use_cache=False).last_hidden_state  # [B, T, H]
        loss = chunked_cross_entropy(hidden[:, :-1][mask], head, labels[mask])  # hidden rows: [label tokens, H]
    return loss, int(mask.sum())


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], *, batch_size: int, pad_id: int,
                  compute_dtype: torch.dtype = torch.float32, loss_fn: LossFn | None = None) -> float:
    """Mean cross-entropy per answer token over `examples` (`loss_fn`: another loss with loss_sum's signature)."""
    if not examples:
        return float("nan")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start:start + batch_size]], pad_id, device)
        with autocast(model, compute_dtype):
            loss, n = (loss_fn or loss_sum)(model, batch)
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _micro_batches(examples: list[Example], cfg: TrainConfig, epoch: int, index: int) -> Iterator[tuple[int, int, list[int]]]:
    """Endless (epoch, index-in-epoch, example indices) from a position, so resume replays the same order."""
    while True:
        batches = epoch_batches(examples, cfg.batch_size, cfg.seed, epoch)
        for i in range(index, len(batches)):
            yield epoch, i, batches[i]
        epoch, index = epoch + 1, 0


def total_steps(n_examples: int, cfg: TrainConfig, processes: int = 1) -> int:
    """Optimizer steps; each consumes grad_accum micro-batches on each of `processes` data-parallel processes."""
    if cfg.max_steps:
        return cfg.max_steps
    batches_per_epoch = math.ceil(n_examples / cfg.batch_size)
    return max(1, math.ceil(cfg.epochs * batches_per_epoch / (cfg.grad_accum * processes)))


def use_packing(model, cfg: TrainConfig, custom_loss: bool = False) -> bool:
    """train.packing: null packs whenever the method allows it and the loss is the built-in one (a method's own
    loss may expect an attention mask); true where packing cannot work is an error, not a silent fallback."""
    if uses_virtual_tokens(model):
        if cfg.packing:
            raise TailorError("train.packing: methods with virtual tokens (prompt_tuning, p_tuning, prefix_tuning) "
                              "prepend them to each row, so examples cannot share a row; set train.packing: false")
        return False
    return bool(cfg.packing) if cfg.packing is not None or custom_loss else True


def _prepare_model(model, cfg: TrainConfig) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if cfg.gradient_checkpointing:
        # non-reentrant checkpointing needs no gradient on the inputs, so it works with a frozen base (LoRA)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        if uses_virtual_tokens(model):
            raise TailorError("train.compile: not supported for methods with virtual tokens; set train.compile: false")
        # in place, so parameter names (checkpoints, the saved artifact) stay as they were
        base.get_decoder().compile(dynamic=True)


def train(model, train_examples: list[Example], eval_examples: list[Example], cfg: TrainConfig, out_dir: Path, *,
          pad_id: int, compute_dtype: torch.dtype = torch.float32, resume: bool = False, show_progress: bool = True,
          should_stop: Callable[[int], bool] | None = None, loss_fn: LossFn | None = None,
          run: dict | None = None) -> TrainResult:
    """Train the parameters of `model` that require grad. `out_dir` receives metrics.jsonl and checkpoints/.

    `loss_fn(model, batch) -> (summed loss, label tokens)` replaces loss_sum (e.g. distillation); a batch holds
    input_ids, labels and either attention_mask or, packed, position_ids (see model_inputs).
    `run` (checkpoint.run_record: method and resolved config) is stored with every checkpoint, and resuming from
    a checkpoint of another method is refused.
    Under `accelerate launch` each process trains on its share of every step and only the main one writes files.
    """
    out_dir = Path(out_dir)
    trackers.check(cfg.report_to)
    packing = use_packing(model, cfg, custom_loss=loss_fn is not None)
    loss_fn = loss_fn or loss_sum
    _prepare_model(model, cfg)
    accelerator = make_accelerator(cfg.report_to, out_dir / "logs")
    main, processes, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    device = accelerator.device
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    steps = total_steps(len(train_examples), cfg, processes)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    # model and loss as one module, so DDP/FSDP see the whole forward (distributed.py)
    wrapped, optimizer = accelerator.prepare(LossModule(model, loss_fn), optimizer)
    # not prepared: accelerate's scheduler wrapper steps once per process, we step once per optimizer step
    scheduler = get_scheduler("constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler, optimizer,
                              num_warmup_steps=int(cfg.warmup_ratio * steps), num_training_steps=steps)
    state = checkpoint.TrainState()
    metrics_path = out_dir / "metrics.jsonl"
    if resume and (latest := checkpoint.latest(out_dir)) is not None:
        state = checkpoint.load(latest, model, optimizer, scheduler, method=run["method"] if run else None)
        if main:
            checkpoint.truncate_metrics(metrics_path, state.step)
    elif main and metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log
    if cfg.report_to:
        accelerator.init_trackers(out_dir.name or "tailor", config=trackers.hyperparameters(cfg))

    def to_batch(ids: list[int]) -> dict:
        examples = [train_examples[i] for i in ids]
        if packing:
            return pack(examples, cfg.pack_length, pad_id, device)
        return collate(examples, pad_id, device)

    model.train()
    batches = _micro_batches(train_examples, cfg, state.epoch, state.batch_index)
    progress = TrainProgress(total=steps, start=state.step, enabled=show_progress and main)
    started = time.perf_counter() - state.elapsed
    window_tokens, window_start = 0, time.perf_counter()
    loss_ema, eval_loss, best_eval, stopped_early = state.last_loss, None, math.inf, False
    with progress, (open(metrics_path, "a", encoding="utf-8") if main else contextlib.nullcontext()) as metrics:
        while state.step < steps:
            # every process draws the same micro-batches and takes every processes-th one from its rank on, so
            # N processes with grad_accum k train exactly like one process with grad_accum N*k
            micro = [next(batches) for _ in range(cfg.grad_accum * processes)]
            mine = [to_batch(ids) for _, _, ids in micro[rank::processes]]
            local = torch.tensor([sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in mine),
                                  sum(len(train_examples[i].input_ids) for _, _, ids in micro[rank::processes]
                                      for i in ids), 0.0], dtype=torch.float64, device=device)
            # normalize by the label tokens of the whole step on all processes, so accumulation and data
            # parallelism both equal one big batch (DDP averages gradients over processes: hence * processes)
            step_label_tokens = int(accelerator.reduce(local.clone(), "sum")[0])
            scale = processes / max(step_label_tokens, 1)
            for index, batch in enumerate(mine):
                sync = index == len(mine) - 1  # gradients cross processes once per step, after the last one
                with contextlib.nullcontext() if sync else accelerator.no_sync(wrapped):
                    with autocast(model, compute_dtype):
                        loss, _ = wrapped(batch)
                    accelerator.backward(loss * scale)
                local[2] += float(loss.detach())
            grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            _, step_tokens, step_loss = (float(x) for x in accelerator.reduce(local, "sum"))

            state.step += 1
            state.tokens += int(step_tokens)
            window_tokens += int(step_tokens)
            state.label_tokens += step_label_tokens
            state.epoch, state.batch_index = micro[-1][0], micro[-1][1] + 1
            state.last_loss = step_loss / max(step_label_tokens, 1)
            loss_ema = state.last_loss if loss_ema is None else 0.9 * loss_ema + 0.1 * state.last_loss
            now = time.perf_counter()
            tokens_per_s = window_tokens / max(now - window_start, 1e-9)
            window_tokens, window_start = 0, now
            state.elapsed = now - started

            record = {"step": state.step, "epoch": round(state.epoch + state.batch_index / max(1, math.ceil(
                len(train_examples) / cfg.batch_size)), 3), "loss": round(state.last_loss, 5),
                "lr": scheduler.get_last_lr()[0], "grad_norm": round(float(grad_norm or 0.0), 4),
                "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(state.elapsed, 2)}
            if cfg.eval_every and state.step % cfg.eval_every == 0 and eval_examples:
                # every process evaluates the whole set: same number everywhere, so early stopping agrees
                eval_loss = evaluate_loss(model, eval_examples, batch_size=cfg.batch_size, pad_id=pad_id,
                                          compute_dtype=compute_dtype, loss_fn=loss_fn)
                record["eval_loss"] = round(eval_loss, 5)
                if cfg.early_stopping_patience and eval_loss >= best_eval:
                    state.bad_evals += 1
                else:
                    state.bad_evals = 0
                best_eval = min(best_eval, eval_loss)
            if main and (state.step % cfg.log_every == 0 or state.step == steps or "eval_loss" in record):
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if cfg.report_to:
                    accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=state.step)
            progress.update(state.step, loss=loss_ema, tokens_per_s=tokens_per_s)

            if cfg.early_stopping_patience and state.bad_evals >= cfg.early_stopping_patience:
                stopped_early = True
            interrupted = should_stop is not None and should_stop(state.step)
            if (cfg.save_every and state.step % cfg.save_every == 0) or interrupted:
                if main:
                    checkpoint.save(out_dir, state, model, optimizer, scheduler, run)
                accelerator.wait_for_everyone()
            if interrupted or stopped_early:
                break

    if eval_examples and (state.step >= steps or stopped_early):
        eval_loss = evaluate_loss(model, eval_examples, batch_size=cfg.batch_size, pad_id=pad_id,
                                  compute_dtype=compute_dtype, loss_fn=loss_fn)
    if cfg.report_to:
        if eval_loss is not None:
            accelerator.log({"eval/loss": eval_loss}, step=state.step)
        accelerator.end_training()
    seconds = time.perf_counter() - started
    return TrainResult(steps=state.step, train_loss=state.last_loss if state.last_loss is not None else float("nan"),
                       eval_loss=eval_loss, label_tokens=state.label_tokens, tokens=state.tokens, seconds=seconds,
                       tokens_per_s=state.tokens / max(seconds, 1e-9), trainable_params=n_trainable,
                       stopped_early=stopped_early)
