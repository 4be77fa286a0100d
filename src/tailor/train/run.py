"""One training run: the run folder's data files in, the method's artifact and metrics out."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from tailor.config import TailorConfig, dump_config
from tailor.errors import TailorError
from tailor.methods import registry
from tailor.models.base import load_model, load_tokenizer, pick_dtype, resolve_base_model
from tailor.train.examples import Example, tokenize_chat
from tailor.train.loop import TrainResult, train
from tailor.workspace import atomic_write_text, read_jsonl, update_manifest

ADAPTER_DIR = "adapter"


def load_chat_examples(path: Path, tokenizer) -> list[Example]:
    examples = []
    for line_no, record in read_jsonl(path):
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise TailorError(f"{path}:{line_no}: expected a non-empty \"messages\" list")
        examples.append(tokenize_chat(tokenizer, messages, where=f"{path}:{line_no}"))
    return examples


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def save_artifact(model, target: Path, config: TailorConfig) -> None:
    """Save the method's artifact (a standard PEFT folder for adapters) with the resolved config beside it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        atomic_write_text(tmp / "tailor.yaml", dump_config(config))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_training(config: TailorConfig, root: Path, run_dir: Path, *, resume: bool = False,
                 show_progress: bool = True, should_stop=None) -> TrainResult:
    run_dir = Path(run_dir)
    train_path, eval_path = run_dir / "data" / "train.jsonl", run_dir / "data" / "eval.jsonl"
    if not train_path.is_file():
        raise TailorError(f"{train_path}: not found; run `tailor data build` first")
    method = registry.get(config.train.method, key="train.method")
    options = config.method_options()
    base_ref = resolve_base_model(config.base_model, root=root)
    tokenizer = load_tokenizer(base_ref)
    train_examples = load_chat_examples(train_path, tokenizer)
    eval_examples = load_chat_examples(eval_path, tokenizer) if eval_path.is_file() else []

    compute_dtype = pick_dtype(config.train.dtype)
    seed_everything(config.train.seed)
    # frozen base weights are stored in the compute dtype (half the memory in bf16); trainable ones stay fp32
    model = load_model(base_ref, dtype=compute_dtype if method.artifact == "adapter" else torch.float32)
    model = method.prepare(model, options)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()

    result = train(model, train_examples, eval_examples, config.train, run_dir, pad_id=tokenizer.pad_token_id,
                   compute_dtype=compute_dtype, resume=resume, show_progress=show_progress, should_stop=should_stop)
    finished = result.steps > 0 and (should_stop is None or not should_stop(result.steps))
    if finished:
        save_artifact(model, run_dir / ADAPTER_DIR, config)
        update_manifest(run_dir, "train", config=config.model_dump(mode="json"),
                        inputs=[train_path, eval_path], outputs=[run_dir / ADAPTER_DIR, run_dir / "metrics.jsonl"],
                        metrics={k: v for k, v in result.to_dict().items() if v is not None},
                        extra={"method": method.name, "base_model": base_ref, "dtype": str(compute_dtype)})
    return result
