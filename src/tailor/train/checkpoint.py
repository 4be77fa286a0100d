"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG states and the data position.

Only parameters that train are saved (for LoRA a few MB, not the frozen base), each checkpoint is written to a
temporary folder and renamed, and the last two are kept.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tailor.workspace import atomic_dir, atomic_write_text

KEEP = 2


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_index: int = 0  # next micro-batch within `epoch`
    tokens: int = 0
    label_tokens: int = 0
    elapsed: float = 0.0
    last_loss: float | None = None
    bad_evals: int = 0


def _folder(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest(out_dir: Path) -> Path | None:
    folder = _folder(out_dir)
    found = sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if folder.is_dir() else []
    return found[-1] if found else None


def save(out_dir: Path, state: TrainState, model, optimizer, scheduler) -> Path:
    folder = _folder(out_dir)
    target = folder / f"step-{state.step}"
    with atomic_dir(target) as tmp:
        trainable = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, tmp / "trainable.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
                   tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
    for old in sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load(folder: Path, model, optimizer, scheduler) -> TrainState:
    trainable = load_file(folder / "trainable.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value)
    saved = torch.load(folder / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    random.setstate(saved["rng"]["python"])
    torch.set_rng_state(saved["rng"]["torch"])
    if saved["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return TrainState(**json.loads((folder / "state.json").read_text()))


def truncate_metrics(metrics_path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the log reads as one uninterrupted run."""
    if not metrics_path.exists():
        return
    kept = [line for line in metrics_path.read_text().splitlines() if line.strip()
            and json.loads(line).get("step", 0) <= step]
    atomic_write_text(metrics_path, "".join(line + "\n" for line in kept))
