"""One training run: the run folder's data files in, the method's artifact and metrics out."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tailor.config import TailorConfig
from tailor.errors import TailorError
from tailor.methods import registry
from tailor.methods.artifacts import (
    build_artifact,
    load_for_training,
    save_artifact,
)
from tailor.models.base import load_tokenizer, pick_dtype, resolve_base_model
from tailor.train import checkpoint
from tailor.train.distributed import is_main_process
from tailor.train.examples import Example, tokenize_chat
from tailor.train.loop import TrainResult, seed_everything, total_steps, train
from tailor.workspace import read_jsonl, update_manifest


def load_chat_examples(path: Path, tokenizer, grounding=None) -> list[Example]:
    """Tokenized chat records; with `grounding`, each with the passages retrieved for its question quoted in the
    prompt, as the model will see them when it is evaluated and served."""
    examples = []
    for line_no, record in read_jsonl(path):
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise TailorError(f"{path}:{line_no}: expected a non-empty \"messages\" list")
        if grounding is not None:
            prompt = messages[:-1] if messages[-1].get("role") == "assistant" else messages
            messages = [*grounding.ground(prompt, grounding.retrieve(prompt), force=True), *messages[len(prompt):]]
        examples.append(tokenize_chat(tokenizer, messages, where=f"{path}:{line_no}"))
    return examples


@dataclass
class BuildResult:
    """What a method that trains nothing reports: no steps and no loss, only what its artifact holds."""

    method: str
    examples: int  # training examples the artifact holds
    seconds: float
    artifact: Path


def run_training(config: TailorConfig, root: Path, run_dir: Path, *, resume: bool = False,
                 show_progress: bool = True, should_stop=None) -> TrainResult | BuildResult:
    """Train the configured method, or build the artifact of one that trains nothing (`resume`, `show_progress`
    and `should_stop` only concern training)."""
    run_dir = Path(run_dir)
    train_path = run_dir / "data" / "train.jsonl"
    method = registry.get(config.train.method, key="train.method")
    registry.check_train_keys(method, config.train)
    if (own_run := method.run) is not None:
        # its own data and artifact (reward, DPO, KTO, PPO, GRPO), trained through the same core (train/loop.py)
        return own_run(config, root, run_dir, show_progress=show_progress, should_stop=should_stop, resume=resume)
    base_ref = resolve_base_model(config.base_model, root=root)
    if not method.trains:
        if method.needs_data and not train_path.is_file():
            raise TailorError(f"{train_path}: not found; run `tailor data build` first")
        return build_method(config, root, run_dir, train_path, base_ref)
    prepared = prepare_training(config, root, run_dir, base_ref=base_ref)
    result, finished = train_phases(prepared, config, run_dir, resume=resume, show_progress=show_progress,
                                    should_stop=should_stop)
    if finished and is_main_process():  # under torchrun/accelerate launch, one process writes the artifact
        artifact = save_artifact(prepared.model, prepared.tokenizer, run_dir, config, root)
        update_manifest(run_dir, "train", config=config.model_dump(mode="json"),
                        inputs=[path for path in prepared.inputs if path.is_file()],
                        outputs=[artifact, run_dir / "metrics.jsonl"],
                        metrics={k: v for k, v in result.to_dict().items() if v is not None},
                        extra={"method": method.name, "base_model": base_ref, "dtype": str(prepared.compute_dtype),
                               "phases": prepared.phase_results})
    return result


@dataclass
class PreparedRun:
    """A method ready to train: its model, tokenizer and phases, before the first step."""

    method: registry.Method
    model: Any
    tokenizer: Any
    phases: list[registry.Phase]
    compute_dtype: torch.dtype
    inputs: list[Path]  # files the run reads, hashed into the manifest
    phase_results: list[dict] = field(default_factory=list)


def sft_phase(run_dir: Path, tokenizer, name: str = "sft", grounding=None) -> registry.Phase:
    """Chat records from RUN/data: loss on the assistant turns (with `grounding`, on retrieved passages)."""
    train_path, eval_path = run_dir / "data" / "train.jsonl", run_dir / "data" / "eval.jsonl"
    if not train_path.is_file():
        raise TailorError(f"{train_path}: not found; run `tailor data build` first")
    eval_examples = load_chat_examples(eval_path, tokenizer, grounding) if eval_path.is_file() else []
    return registry.Phase(name, load_chat_examples(train_path, tokenizer, grounding), eval_examples)


def training_grounding(config: TailorConfig, root: Path, run_dir: Path, tokenizer, *, force: bool = False):
    """retrieval.enabled (or `force`: a method that always retrieves): the retrieval that training prompts get,
    with the settings eval and serve will use."""
    if not (config.retrieval.enabled or force):
        return None
    from tailor.retrieval.grounding import Grounding, index_folder
    from tailor.retrieval.search import Retriever

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return Grounding(Retriever(index_folder(config, root, run_dir), config.retrieval, count_tokens),
                     config.system_prompt)


def prepare_training(config: TailorConfig, root: Path, run_dir: Path, *, base_ref: str | None = None
                     ) -> PreparedRun:
    """Tokenizer, phases (their data checked), then the model prepared by the method, seeded."""
    run_dir = Path(run_dir)
    method = registry.get(config.train.method, key="train.method")
    base_ref = base_ref or resolve_base_model(config.base_model, root=root)
    compute_dtype = pick_dtype(config.train.dtype)
    context = registry.TrainContext(config, Path(root), run_dir, base_ref, compute_dtype,
                                    config.method_options(method.name))
    tokenizer = method.tokenizer(context) if method.tokenizer else load_tokenizer(base_ref)
    phases = method.phases(context, tokenizer) if method.phases else [
        sft_phase(run_dir, tokenizer, grounding=training_grounding(config, Path(root), run_dir, tokenizer))]
    for phase in phases:
        if not phase.train_examples:
            raise TailorError(f"train.method: {method.name} has no training examples for its {phase.name} phase")
    seed_everything(config.train.seed)
    model = load_for_training(config, base_ref, compute_dtype)
    inputs = [run_dir / "corpus.jsonl", run_dir / "data" / "train.jsonl", run_dir / "data" / "eval.jsonl"]
    return PreparedRun(method, model, tokenizer, phases, compute_dtype, inputs)


PHASES_DIR = "phases"


def train_phases(prepared: PreparedRun, config: TailorConfig, run_dir: Path, *, resume: bool = False,
                 show_progress: bool = True, should_stop=None) -> tuple[TrainResult, bool]:
    """Run the phases in order through the one training core; returns the combined result and whether every
    phase finished (False when `should_stop` interrupted one).

    Earlier phases log and checkpoint into RUN/phases/<name>/ and always end with a checkpoint, so `--resume`
    after a later phase started restores their final weights; the last phase writes RUN/metrics.jsonl.
    `should_stop` sees the step counted over all phases.
    """
    run_dir = Path(run_dir)
    if not resume:
        shutil.rmtree(run_dir / PHASES_DIR, ignore_errors=True)  # stale checkpoints must not be resumed later
    results: list[TrainResult] = []
    offset, interrupted = 0, False
    prepared.phase_results = []
    trained_by = checkpoint.run_record(prepared.method.name, config)  # stored with every checkpoint
    for index, phase in enumerate(prepared.phases):
        last = index == len(prepared.phases) - 1
        cfg = config.train.model_copy(update={k: v for k, v in (("max_steps", phase.max_steps),
                                                                ("epochs", phase.epochs)) if v is not None})
        steps = total_steps(len(phase.train_examples), cfg)
        stopped: list[int] = []

        def stop(step: int, offset=offset, steps=steps, last=last, stopped=stopped) -> bool:
            if should_stop is not None and should_stop(offset + step):
                stopped.append(step)
                return True
            return not last and step >= steps  # an earlier phase ends on a checkpoint of its final weights

        out_dir = run_dir if last else run_dir / PHASES_DIR / phase.name
        result = train(prepared.model, phase.train_examples, phase.eval_examples, cfg, out_dir,
                       pad_id=prepared.tokenizer.pad_token_id, compute_dtype=prepared.compute_dtype, resume=resume,
                       show_progress=show_progress, should_stop=stop, loss_fn=phase.loss_fn, run=trained_by)
        results.append(result)
        prepared.phase_results.append({"phase": phase.name, "steps": result.steps, "train_loss": result.train_loss,
                                       "eval_loss": result.eval_loss, "examples": len(phase.train_examples)})
        offset += result.steps
        if stopped:  # early stopping only ends its own phase; an interruption ends the run
            interrupted = True
            break
    final = results[-1]
    seconds = sum(r.seconds for r in results)
    tokens = sum(r.tokens for r in results)
    combined = TrainResult(steps=offset, train_loss=final.train_loss, eval_loss=final.eval_loss,
                           label_tokens=sum(r.label_tokens for r in results), tokens=tokens, seconds=seconds,
                           tokens_per_s=tokens / max(seconds, 1e-9), trainable_params=final.trainable_params,
                           stopped_early=any(r.stopped_early for r in results))
    return combined, offset > 0 and not interrupted


def build_method(config: TailorConfig, root: Path, run_dir: Path, train_path: Path, base_ref: str) -> BuildResult:
    """No model, optimizer or checkpoint: the method's artifact is built from the training records."""
    started = time.perf_counter()
    conversations = []
    for line_no, record in read_jsonl(train_path) if train_path.is_file() else ():
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise TailorError(f"{train_path}:{line_no}: expected a non-empty \"messages\" list")
        conversations.append(messages)
    artifact, examples = build_artifact(conversations, run_dir, config, root)
    result = BuildResult(config.train.method, examples, round(time.perf_counter() - started, 2), artifact)
    update_manifest(run_dir, "train", config=config.model_dump(mode="json"),
                    inputs=[train_path] if train_path.is_file() else [], outputs=[artifact],
                    metrics={"examples": examples, "seconds": result.seconds},
                    extra={"method": result.method, "base_model": base_ref})
    return result
