"""DPO: direct preference optimization (Rafailov et al., 2023) through TRL's DPOTrainer, on LoRA or full weights.

No reward model and no sampling: the policy is pushed to raise the log-probability margin of chosen over rejected
answers relative to a frozen reference. Starting from an SFT run's adapter (`init_adapter`), TRL keeps a frozen
copy of that adapter as the reference; from the base, the reference is the base with the adapter switched off.
The artifact is the usual `RUN/adapter/` (or `RUN/model/` for full), so `tailor eval` and `tailor serve` use it.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from tailor.config import TailorConfig
from tailor.methods.alignment import (MetricsLog, adapter_folder, preference_pairs, record_training, save_adapter,
                                      split_pairs)
from tailor.methods.lora import UsesLora, lora_config
from tailor.methods.registry import Method, register, require_modules
from tailor.models.base import load_model, load_tokenizer, pick_dtype, resolve_base_model
from tailor.train.loop import TrainResult
from tailor.train.progress import TrainProgress


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


def _policy(base_ref: str, dtype: torch.dtype, options: DpoOptions, root: Path):
    """(model, peft_config for TRL or None)."""
    import peft

    if options.adapter == "full":
        if options.init_adapter:
            from tailor.errors import TailorError

            raise TailorError("methods.dpo.init_adapter: an adapter start needs methods.dpo.adapter: lora (to start "
                              "a full fine-tune from an SFT run, set base_model to its merged export)")
        return load_model(base_ref, dtype=torch.float32), None
    base = load_model(base_ref, dtype=dtype)
    if options.init_adapter:
        folder = adapter_folder(options.init_adapter, root, "methods.dpo.init_adapter")
        model = peft.PeftModel.from_pretrained(base, str(folder), is_trainable=True)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        return model, None  # TRL copies the adapter as the frozen reference ("ref")
    require_modules(base, options.lora.targets, "methods.dpo.lora.targets")
    return base, lora_config(options.lora)  # the `lora` options shape a fresh adapter only


def _conversational(pair: dict) -> dict:
    return {"prompt": pair["prompt"], "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}]}


def run(config: TailorConfig, root: Path, run_dir: Path, *, show_progress: bool = True, should_stop=None,
        **_) -> TrainResult:
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    options: DpoOptions = config.method_options("dpo")
    cfg = config.train
    run_dir = Path(run_dir)
    base_ref = resolve_base_model(config.base_model, root=root)
    tokenizer = load_tokenizer(base_ref)
    pairs, source = preference_pairs(options.preference_file, root, run_dir, "methods.dpo.preference_file",
                                     tokenizer, options.max_tokens)
    train_pairs, eval_pairs = split_pairs(pairs, options.eval_fraction, cfg.seed)
    dtype = pick_dtype(cfg.dtype)
    from tailor.train.run import seed_everything

    seed_everything(cfg.seed)
    model, peft_config = _policy(base_ref, dtype, options, root)
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(len(train_pairs) / cfg.batch_size)
                                              / cfg.grad_accum))
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".dpo-", dir=run_dir)  # TRL wants an output folder; we save ourselves
    args = DPOConfig(
        output_dir=scratch, max_steps=steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler,
        warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed, beta=options.beta, loss_type=[options.loss_type], max_length=options.max_tokens,
        logging_steps=cfg.log_every, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, eval_strategy="no",
        per_device_eval_batch_size=cfg.batch_size,
        # the policy's weights are stored in the compute dtype already (no autocast needed, see train/loop.py)
        bf16=False, fp16=False)

    progress = TrainProgress(total=steps, enabled=show_progress, description="dpo")
    metrics = MetricsLog(run_dir)
    last: dict = {}

    class Report(TrainerCallback):
        """TRL's log lines → metrics.jsonl and our progress bar; `should_stop` ends the run between steps."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                last.update(logs)
                metrics.write({"step": state.global_step, **{k: v for k, v in logs.items()
                                                               if isinstance(v, int | float)},
                               "elapsed_s": time.perf_counter() - started})
                progress.update(state.global_step, loss=logs["loss"], tokens_per_s=0.0)

        def on_step_end(self, args, state, control, **kwargs):
            if should_stop is not None and should_stop(state.global_step):
                control.should_training_stop = True

    trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer, peft_config=peft_config,
                         train_dataset=Dataset.from_list([_conversational(p) for p in train_pairs]),
                         eval_dataset=Dataset.from_list([_conversational(p) for p in eval_pairs]) if eval_pairs
                         else None, callbacks=[Report()])
    trainer.remove_callback(PrinterCallback)  # with tqdm off, Trainer prints every log dict; ours is the bar
    try:
        with progress:
            output = trainer.train()
        eval_loss = float(trainer.evaluate()["eval_loss"]) if eval_pairs else None
    finally:
        metrics.close()
        shutil.rmtree(scratch, ignore_errors=True)
    model = trainer.model
    if options.adapter == "lora":
        artifact = save_adapter(model, run_dir, config)
    else:
        from tailor.config import dump_config
        from tailor.workspace import atomic_dir, atomic_write_text

        artifact = run_dir / "model"
        with atomic_dir(artifact) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_text(tmp / "tailor.yaml", dump_config(config))
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    result = TrainResult(steps=output.global_step, train_loss=float(last.get("loss", output.training_loss)),
                         eval_loss=eval_loss, label_tokens=0, tokens=0, seconds=time.perf_counter() - started,
                         tokens_per_s=0.0, trainable_params=trainable)
    record_training(run_dir, config, "dpo", base_ref, dtype, [source], artifact,
                    {**result.to_dict(), **{k: last[k] for k in ("rewards/accuracies", "rewards/margins")
                                             if k in last}})
    return result


register(Method(name="dpo", options=DpoOptions, run=run, artifact="adapter",
                artifact_for=lambda options: "adapter" if options.adapter == "lora" else "model",
                summary="Direct preference optimization on preference pairs (TRL's DPOTrainer), LoRA or full."))
