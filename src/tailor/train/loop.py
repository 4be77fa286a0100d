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
import os
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute
from transformers import get_scheduler

from tailor.config import TrainConfig
from tailor.errors import TailorError
from tailor.train import checkpoint, trackers
from tailor.train.distributed import LossFn, LossModule, make_accelerator, process_layout
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
    interrupted: bool = False  # should_stop ended it before the last step: resume it, the artifact is not written
    eval_stats: dict = field(default_factory=dict)  # the objective's statistics on the eval items (e.g. accuracy)

    def to_dict(self) -> dict:
        """Flat: the objective's eval statistics as eval_<name>."""
        flat = asdict(self)
        return flat | {f"eval_{k}": v for k, v in flat.pop("eval_stats").items()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


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
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = grad_logits @ weight  # [c, H]
            if grad_weight is not None:
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


def _vocabulary(head: torch.nn.Module) -> int:
    weight = head.weight
    assert isinstance(weight, torch.Tensor)  # a Linear, or PEFT's wrapper around one
    return weight.shape[0]


def chunked_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of cross-entropy(head(hidden), targets), holding at most CHUNK_LOGITS logits at a time.
    hidden [N, H], targets [N]."""
    chunk = max(1, CHUNK_LOGITS // _vocabulary(head))
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


def _token_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each token [N] (not summed: pair and unpaired losses weight each sequence differently),
    one chunk of logits at a time, recomputed in backward instead of kept."""
    chunk = max(1, CHUNK_LOGITS // _vocabulary(head))

    def chunk_loss(h, t):
        return F.cross_entropy(head(h).float(), t, reduction="none")

    parts = [recompute(chunk_loss, hidden[s:s + chunk], targets[s:s + chunk], use_reentrant=False)
             if torch.is_grad_enabled() else chunk_loss(hidden[s:s + chunk], targets[s:s + chunk])
             for s in range(0, hidden.shape[0], chunk)]
    return torch.cat(parts) if parts else hidden.new_zeros((0,), dtype=torch.float32)


def sequence_log_probs(model, batch: dict) -> torch.Tensor:
    """Summed log-probability of each row's label tokens [B] (DPO's and KTO's log π(y|x)); padded batches only."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE  # [B, T-1]
    decoder, head = _decoder_and_head(model)
    if decoder is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, -batch["input_ids"].shape[1]:]
        token_loss = F.cross_entropy(logits[:, :-1][mask].float(), labels[mask], reduction="none")
    else:
        hidden = decoder(**model_inputs(batch), use_cache=False).last_hidden_state  # [B, T, H]
        token_loss = _token_cross_entropy(hidden[:, :-1][mask], head, labels[mask])  # [label tokens]
    per_token = torch.zeros(mask.shape, dtype=torch.float32, device=token_loss.device)
    per_token[mask] = -token_loss
    return per_token.sum(dim=1)


class StepLoss(torch.nn.Module, ABC):
    """What one optimizer step minimizes, for the Stepper: the summed loss of a batch with summed statistics. Its
    own parameters (the reward head, PPO's value head) train with the model's and are checkpointed with them.
    Rollout methods (PPO, GRPO) build their batches themselves; objectives over items add how to batch them."""

    stats: tuple[str, ...] = ()  # names of the summed statistics `forward` returns, reported per unit

    @abstractmethod
    def forward(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's summed loss and its summed `stats`."""


class Objective(StepLoss):
    """What a phase of training minimizes on the one core: how its items become batches, the summed loss of a batch
    with summed statistics, and the units the sums are divided by (label tokens, pairs, examples).

    A subclass's own parameters (e.g. the reward model's head) train with the model's and are checkpointed with
    them. `collate` puts two ints in every batch: "units" (what the summed loss is normalized by, so gradient
    accumulation and data parallelism equal one big batch) and "tokens" (real tokens, for tokens/s).
    """

    @abstractmethod
    def lengths(self, items: list) -> list[int]:
        """Tokens per item, so batches group similar lengths."""

    @abstractmethod
    def collate(self, items: list, device) -> dict:
        """One batch of `items` on `device`, with its "units" and "tokens"."""


class NextToken(Objective):
    """Next-token cross-entropy on the label tokens of chat records or corpus blocks (or a method's loss with the
    same contract, e.g. distillation's), packed into rows where allowed."""

    def __init__(self, pad_id: int, packing: bool = False, pack_length: int | None = None,
                 loss_fn: LossFn | None = None):
        super().__init__()
        self.pad_id, self.packing, self.pack_length, self.loss_fn = pad_id, packing, pack_length, loss_fn or loss_sum

    def lengths(self, items: list[Example]) -> list[int]:
        return [len(e.input_ids) for e in items]

    def collate(self, items: list[Example], device) -> dict:
        batch: dict[str, torch.Tensor | None]
        if self.packing:
            assert self.pack_length is not None  # given with packing
            batch = pack(items, self.pack_length, self.pad_id, device)
        else:
            batch = dict(collate(items, self.pad_id, device))
        labels = batch["labels"]
        assert labels is not None  # only a packed batch's attention_mask is None
        return batch | {"units": int((labels[:, 1:] != IGNORE).sum()),
                        "tokens": sum(len(e.input_ids) for e in items)}

    def forward(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss_fn(model, batch)[0], {}


@torch.no_grad()
def evaluate(model, items: list, objective: Objective, *, batch_size: int,
             compute_dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """The objective's loss and statistics per unit over `items` ({"loss": nan} without items)."""
    if not items:
        return {"loss": float("nan")}
    device = next(model.parameters()).device
    was_training = model.training, objective.training
    model.eval()
    objective.eval()
    totals = dict.fromkeys(("loss", *objective.stats), 0.0)
    units = 0
    lengths = objective.lengths(items)
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        batch = objective.collate([items[i] for i in order[start:start + batch_size]], device)
        with autocast(model, compute_dtype):
            loss, stats = objective(model, batch)
        totals["loss"] += float(loss)
        for name in objective.stats:
            totals[name] += float(stats[name])
        units += batch["units"]
    model.train(was_training[0])
    objective.train(was_training[1])
    return {name: value / max(units, 1) for name, value in totals.items()}


def evaluate_loss(model, examples: list[Example], *, batch_size: int, pad_id: int,
                  compute_dtype: torch.dtype = torch.float32, loss_fn: LossFn | None = None) -> float:
    """Mean cross-entropy per answer token over `examples` (`loss_fn`: another loss with loss_sum's signature)."""
    return evaluate(model, examples, NextToken(pad_id, loss_fn=loss_fn), batch_size=batch_size,
                    compute_dtype=compute_dtype)["loss"]


def _micro_batches(lengths: list[int], cfg: TrainConfig, epoch: int, index: int
                   ) -> Iterator[tuple[int, int, list[int]]]:
    """Endless (epoch, index-in-epoch, example indices) from a position, so resume replays the same order."""
    while True:
        batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch)
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


class Stepper:
    """What every optimizer step does, once, for the loop below and for the rollout methods (PPO, GRPO): AdamW over
    the trainable parameters of the model and of the objective, warm-up and decay, clipping, metrics.jsonl, the
    progress bar, checkpoints and resume. The caller computes the loss and calls `backward` on each micro-batch,
    then `step` once per optimizer step.
    """

    def __init__(self, model, objective: StepLoss, cfg: TrainConfig, out_dir: Path, steps: int, *,
                 run: dict | None = None, resume: bool = False, show_progress: bool = True,
                 description: str = "training"):
        trackers.check(cfg.report_to)
        self.cfg, self.out_dir, self.steps, self.run = cfg, Path(out_dir), steps, run
        self.accelerator = make_accelerator(cfg.report_to, self.out_dir / "logs")
        self.main = self.accelerator.is_main_process
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        # model and loss as one module, so DDP/FSDP see the whole forward (distributed.py); its parameter names
        # (model.*, objective.*) are the checkpoint's
        self.module = LossModule(model, objective)
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in self.trainable)
        optimizer = torch.optim.AdamW(self.trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.wrapped, self.optimizer = self.accelerator.prepare(self.module, optimizer)
        # not prepared: accelerate's scheduler wrapper steps once per process, we step once per optimizer step
        self.scheduler = get_scheduler("constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler,
                                       self.optimizer, num_warmup_steps=int(cfg.warmup_ratio * steps),
                                       num_training_steps=steps)
        self.state = checkpoint.TrainState()
        self.metrics_path = self.out_dir / "metrics.jsonl"
        if resume and (latest := checkpoint.latest(self.out_dir)) is not None:
            self.state = checkpoint.load(latest, self.module, self.optimizer, self.scheduler,
                                         method=run["method"] if run else None)
            if self.main:
                checkpoint.truncate_metrics(self.metrics_path, self.state.step)
        elif self.main and self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run starts a fresh log
        if cfg.report_to:
            self.accelerator.init_trackers(self.out_dir.name or "tailor", config=trackers.hyperparameters(cfg))
        self.progress = TrainProgress(total=steps, start=self.state.step, enabled=show_progress and self.main,
                                      description=description)
        self._metrics = open(self.metrics_path, "a", encoding="utf-8") if self.main else None
        self._started = time.perf_counter() - self.state.elapsed
        self._window_start = time.perf_counter()
        self.loss_ema = self.state.last_loss

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._metrics is not None:
            self._metrics.close()
        return self.progress.__exit__(*exc)

    @property
    def done(self) -> bool:
        return self.state.step >= self.steps

    def backward(self, loss: torch.Tensor, *, sync: bool = True) -> None:
        """Backward of one micro-batch's (already normalized) loss; `sync`: the step's last, whose gradients
        cross processes."""
        if sync:
            self.accelerator.backward(loss)
        else:
            with self.accelerator.no_sync(self.wrapped):
                self.accelerator.backward(loss)

    def step(self, loss: float, *, tokens: int = 0, label_tokens: int = 0, record: dict | None = None) -> dict:
        """Clip, step optimizer and schedule, count, and log `record` (with loss, lr, grad norm, tokens/s added);
        returns the record, to which the caller may add before `log`."""
        grad_norm = self.accelerator.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state = self.state
        state.step += 1
        state.tokens += tokens
        state.label_tokens += label_tokens
        state.last_loss = loss
        self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
        now = time.perf_counter()
        tokens_per_s = tokens / max(now - self._window_start, 1e-9)
        self._window_start = now
        state.elapsed = now - self._started
        self.tokens_per_s = tokens_per_s
        return {"step": state.step, **(record or {}), "loss": round(loss, 5), "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": round(float(grad_norm or 0.0), 4), "tokens_per_s": round(tokens_per_s, 1),
                "elapsed_s": round(state.elapsed, 2)}

    def log(self, record: dict, *, force: bool = False) -> None:
        """Write a step's record (every log_every steps, the last, and any `force`d one) and move the bar."""
        # only the main process has the metrics file open
        if self._metrics is not None and (force or self.state.step % self.cfg.log_every == 0 or self.done):
            self._metrics.write(json.dumps({k: round(v, 5) if isinstance(v, float) else v
                                            for k, v in record.items()}) + "\n")
            self._metrics.flush()
            if self.cfg.report_to:
                self.accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"},
                                     step=self.state.step)
        self.progress.update(self.state.step, loss=self.loss_ema, tokens_per_s=self.tokens_per_s)

    def checkpoint(self) -> None:
        if self.main:
            checkpoint.save(self.out_dir, self.state, self.module, self.optimizer, self.scheduler, self.run)
        self.accelerator.wait_for_everyone()

    def finish(self, eval_metrics: dict | None = None) -> None:
        if self.cfg.report_to:
            if eval_metrics:
                self.accelerator.log({f"eval/{k}": v for k, v in eval_metrics.items()}, step=self.state.step)
            self.accelerator.end_training()

    def result(self, eval_metrics: dict | None = None, stopped_early: bool = False,
               interrupted: bool = False) -> TrainResult:
        seconds = time.perf_counter() - self._started
        eval_metrics = eval_metrics or {}
        return TrainResult(steps=self.state.step, train_loss=self.state.last_loss if self.state.last_loss is not None
                           else float("nan"), eval_loss=eval_metrics.get("loss"),
                           label_tokens=self.state.label_tokens, tokens=self.state.tokens, seconds=seconds,
                           tokens_per_s=self.state.tokens / max(seconds, 1e-9),
                           trainable_params=self.trainable_params, stopped_early=stopped_early,
                           interrupted=interrupted, eval_stats={k: v for k, v in eval_metrics.items() if k != "loss"})


def train(model, train_examples: list, eval_examples: list, cfg: TrainConfig, out_dir: Path, *,
          pad_id: int | None = None, compute_dtype: torch.dtype = torch.float32, resume: bool = False,
          show_progress: bool = True, should_stop: Callable[[int], bool] | None = None,
          loss_fn: LossFn | None = None, objective: Objective | None = None, run: dict | None = None,
          description: str = "training") -> TrainResult:
    """Train the parameters of `model` (and of `objective`) that require grad. `out_dir` receives metrics.jsonl
    and checkpoints/.

    `objective` turns the items into batches and losses (reward pairs, DPO pairs, KTO examples); None: next-token
    cross-entropy on `Example`s padded with `pad_id`, through `loss_fn(model, batch) -> (summed loss, label
    tokens)` when given (e.g. distillation) instead of loss_sum; a batch holds input_ids, labels and either
    attention_mask or, packed, position_ids (see model_inputs).
    `run` (checkpoint.run_record: method and resolved config) is stored with every checkpoint, and resuming from
    a checkpoint of another method is refused.
    Under `accelerate launch` each process trains on its share of every step and only the main one writes files.
    """
    if objective is None:
        assert pad_id is not None, "the next-token objective pads with the tokenizer's pad id"
        objective = NextToken(pad_id, use_packing(model, cfg, custom_loss=loss_fn is not None), cfg.pack_length,
                              loss_fn)
    _prepare_model(model, cfg)
    lengths = objective.lengths(train_examples)
    processes, rank = process_layout()
    steps = total_steps(len(train_examples), cfg, processes)
    stepper = Stepper(model, objective, cfg, out_dir, steps, run=run, resume=resume, show_progress=show_progress,
                      description=description)
    accelerator, device, state = stepper.accelerator, stepper.accelerator.device, stepper.state
    per_epoch = max(1, math.ceil(len(train_examples) / cfg.batch_size))

    model.train()
    objective.train()
    batches = _micro_batches(lengths, cfg, state.epoch, state.batch_index)
    eval_metrics: dict = {}
    best_eval, stopped_early, interrupted = math.inf, False, False
    with stepper:
        while not stepper.done:
            # every process draws the same micro-batches and takes every processes-th one from its rank on, so
            # N processes with grad_accum k train exactly like one process with grad_accum N*k
            micro = [next(batches) for _ in range(cfg.grad_accum * processes)]
            mine = [objective.collate([train_examples[i] for i in ids], device) for _, _, ids in micro[rank::processes]]
            local = torch.tensor([sum(b["units"] for b in mine), sum(b["tokens"] for b in mine), 0.0,
                                  *[0.0] * len(objective.stats)], dtype=torch.float64, device=device)
            # normalize by the units of the whole step on all processes, so accumulation and data parallelism
            # both equal one big batch (DDP averages gradients over processes: hence * processes)
            step_units = int(accelerator.reduce(local.clone(), "sum")[0])
            scale = processes / max(step_units, 1)
            for index, batch in enumerate(mine):
                with autocast(model, compute_dtype):
                    loss, stats = stepper.wrapped(batch)
                # gradients cross processes once per step, after the last micro-batch
                stepper.backward(loss * scale, sync=index == len(mine) - 1)
                local[2] += float(loss.detach())
                for j, name in enumerate(objective.stats):
                    local[3 + j] += float(stats[name])
            totals = [float(x) for x in accelerator.reduce(local, "sum")]
            state.epoch, state.batch_index = micro[-1][0], micro[-1][1] + 1
            record = stepper.step(totals[2] / max(step_units, 1), tokens=int(totals[1]),
                                  label_tokens=step_units if isinstance(objective, NextToken) else 0,
                                  record={"epoch": round(state.epoch + state.batch_index / per_epoch, 3)})
            record |= {name: round(totals[3 + j] / max(step_units, 1), 5) for j, name in enumerate(objective.stats)}
            if cfg.eval_every and state.step % cfg.eval_every == 0 and eval_examples:
                # every process evaluates the whole set: same number everywhere, so early stopping agrees
                eval_metrics = evaluate(model, eval_examples, objective, batch_size=cfg.batch_size,
                                        compute_dtype=compute_dtype)
                record |= {f"eval_{k}": round(v, 5) for k, v in eval_metrics.items()}
                if cfg.early_stopping_patience and eval_metrics["loss"] >= best_eval:
                    state.bad_evals += 1
                else:
                    state.bad_evals = 0
                best_eval = min(best_eval, eval_metrics["loss"])
            stepper.log(record, force="eval_loss" in record)

            if cfg.early_stopping_patience and state.bad_evals >= cfg.early_stopping_patience:
                stopped_early = True
            interrupted = should_stop is not None and should_stop(state.step)
            if (cfg.save_every and state.step % cfg.save_every == 0) or interrupted:
                stepper.checkpoint()
            if interrupted or stopped_early:
                break

    if eval_examples and (stepper.done or stopped_early):
        eval_metrics = evaluate(model, eval_examples, objective, batch_size=cfg.batch_size,
                                compute_dtype=compute_dtype)
    stepper.finish(eval_metrics)
    return stepper.result(eval_metrics, stopped_early, interrupted and not stepper.done)
