"""One training run: the run folder's data files in, the method's artifact and metrics out."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tailor.config import TailorConfig
from tailor.errors import TailorError
from tailor.methods import registry
from tailor.methods.artifacts import ADAPTER_DIR  # noqa: F401 (re-exported)
from tailor.methods.artifacts import build_artifact, load_for_training, save_artifact
from tailor.models.base import load_tokenizer, pick_dtype, resolve_base_model
from tailor.train.examples import Example, tokenize_chat
from tailor.train.loop import TrainResult, train
from tailor.workspace import read_jsonl, update_manifest


def load_chat_examples(path: Path, tokenizer) -> list[Example]:
    examples = []
    for line_no, record in read_jsonl(path):
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise TailorError(f"{path}:{line_no}: expected a non-empty \"messages\" list")
        examples.append(tokenize_chat(tokenizer, messages, where=f"{path}:{line_no}"))
    return examples


@dataclass
class BuildResult:
    """What a method that trains nothing reports: no steps and no loss, only what its artifact holds."""

    method: str
    examples: int  # training examples the artifact holds
    seconds: float
    artifact: Path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def run_training(config: TailorConfig, root: Path, run_dir: Path, *, resume: bool = False,
                 show_progress: bool = True, should_stop=None) -> TrainResult | BuildResult:
    """Train the configured method, or build the artifact of one that trains nothing (`resume`, `show_progress`
    and `should_stop` only concern training)."""
    run_dir = Path(run_dir)
    train_path, eval_path = run_dir / "data" / "train.jsonl", run_dir / "data" / "eval.jsonl"
    if not train_path.is_file():
        raise TailorError(f"{train_path}: not found; run `tailor data build` first")
    method = registry.get(config.train.method, key="train.method")
    base_ref = resolve_base_model(config.base_model, root=root)
    if not method.trains:
        return build_method(config, run_dir, train_path, base_ref)
    tokenizer = load_tokenizer(base_ref)
    train_examples = load_chat_examples(train_path, tokenizer)
    eval_examples = load_chat_examples(eval_path, tokenizer) if eval_path.is_file() else []

    compute_dtype = pick_dtype(config.train.dtype)
    seed_everything(config.train.seed)
    model = load_for_training(config, base_ref, compute_dtype)

    result = train(model, train_examples, eval_examples, config.train, run_dir, pad_id=tokenizer.pad_token_id,
                   compute_dtype=compute_dtype, resume=resume, show_progress=show_progress, should_stop=should_stop)
    finished = result.steps > 0 and (should_stop is None or not should_stop(result.steps))
    if finished:
        artifact = save_artifact(model, tokenizer, run_dir, config)
        update_manifest(run_dir, "train", config=config.model_dump(mode="json"),
                        inputs=[train_path, eval_path], outputs=[artifact, run_dir / "metrics.jsonl"],
                        metrics={k: v for k, v in result.to_dict().items() if v is not None},
                        extra={"method": method.name, "base_model": base_ref, "dtype": str(compute_dtype)})
    return result


def build_method(config: TailorConfig, run_dir: Path, train_path: Path, base_ref: str) -> BuildResult:
    """No model, optimizer or checkpoint: the method's artifact is built from the training records."""
    started = time.perf_counter()
    conversations = []
    for line_no, record in read_jsonl(train_path):
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise TailorError(f"{train_path}:{line_no}: expected a non-empty \"messages\" list")
        conversations.append(messages)
    artifact, examples = build_artifact(conversations, run_dir, config)
    result = BuildResult(config.train.method, examples, round(time.perf_counter() - started, 2), artifact)
    update_manifest(run_dir, "train", config=config.model_dump(mode="json"), inputs=[train_path], outputs=[artifact],
                    metrics={"examples": examples, "seconds": result.seconds},
                    extra={"method": result.method, "base_model": base_ref})
    return result
