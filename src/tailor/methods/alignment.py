"""What the alignment methods (reward, dpo, ppo) share: where their data and starting adapters come from, the
policy with its frozen reference, and writing the artifact, metrics and manifest like the training core does.

Not a method itself: listed in the registry's HELPER_MODULES.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch

from tailor.config import TailorConfig, dump_config
from tailor.errors import TailorError
from tailor.methods.lora import LoraOptions
from tailor.methods.lora import prepare as add_lora
from tailor.models.base import load_model
from tailor.workspace import atomic_dir, atomic_write_text, update_manifest

PREFERENCE_FILE = "data/preferences.jsonl"  # where `tailor data build` and `tailor feedback export` put pairs
REFERENCE = "reference"  # name of the frozen copy of the starting adapter


def resolve_path(value: str, root: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(root) / path


def adapter_folder(value: str, root: Path, key: str) -> Path:
    """A run folder (its adapter/) or an adapter folder itself."""
    path = resolve_path(value, root)
    for folder in (path / "adapter", path):
        if (folder / "adapter_config.json").is_file():
            return folder
    raise TailorError(f"{key}: {path} holds no PEFT adapter (no adapter_config.json in it or in its adapter/ "
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


def split_pairs(pairs: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle, then the last share held out (at least one pair when asked for and possible)."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = min(len(pairs) - 1, max(1, round(eval_fraction * len(pairs)))) if eval_fraction > 0 else 0
    train = [pairs[i] for i in order[:len(order) - held]]
    return train, [pairs[i] for i in order[len(order) - held:]]


def load_policy(base_ref: str, dtype: torch.dtype, init_adapter: str | None, root: Path, key: str,
                lora: LoraOptions):
    """The policy: the starting adapter (an SFT run's) trainable as "default", plus a frozen copy of it as the
    reference; or, without one, a fresh LoRA (`lora`) on the base, whose reference is the base with adapters
    disabled. Either way one set of base weights in memory. `key`: the method's options in tailor.yaml."""
    import peft

    base = load_model(base_ref, dtype=dtype)
    if init_adapter:
        folder = adapter_folder(init_adapter, root, f"{key}.init_adapter")
        model = peft.PeftModel.from_pretrained(base, str(folder), is_trainable=True)
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
    target = Path(run_dir) / "adapter"
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, selected_adapters=["default"])
        atomic_write_text(tmp / "tailor.yaml", dump_config(config))
    return target


class MetricsLog:
    """metrics.jsonl, one line per step, started fresh like the training core does."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in record.items()})
                         + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def record_training(run_dir: Path, config: TailorConfig, method: str, base_ref: str, dtype: torch.dtype,
                    inputs: list[Path], artifact: Path, metrics: dict) -> None:
    update_manifest(run_dir, "train", config=config.model_dump(mode="json"), inputs=inputs,
                    outputs=[artifact, Path(run_dir) / "metrics.jsonl"],
                    metrics={k: v for k, v in metrics.items() if v is not None},
                    extra={"method": method, "base_model": base_ref, "dtype": str(dtype)})
