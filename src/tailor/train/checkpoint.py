"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG states and the data position, with the
method and the resolved config beside them (checkpoint.json), so a checkpoint says what trained it.

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

from tailor.errors import TailorError
from tailor.workspace import atomic_dir, atomic_write_text, read_json, write_json

KEEP = 2
RUN_FILE = "checkpoint.json"  # {"method": ..., "config": ...}


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


def run_record(method: str, config) -> dict:
    """What trained a checkpoint: the method and the config (a TailorConfig) with the method's options resolved,
    defaults filled in, as they were when it was written."""
    resolved = config.model_dump(mode="json")
    resolved["methods"] = {**resolved["methods"], method: config.method_options(method).model_dump(mode="json")}
    return {"method": method, "config": resolved}


def save(out_dir: Path, state: TrainState, model, optimizer, scheduler, run: dict | None = None) -> Path:
    """Write RUN/checkpoints/step-N (`run`: `run_record`'s method and config, stored as checkpoint.json)."""
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
        if run is not None:
            write_json(tmp / RUN_FILE, run)
    for old in sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def check_method(folder: Path, method: str) -> None:
    """Resuming continues the same method: another one's weights and optimizer state do not mean the same thing,
    even where their parameter names agree (lora and raft)."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():  # written before checkpoints recorded their run: nothing to compare
        return
    saved = read_json(path).get("method")
    if saved != method:
        raise TailorError(f"--resume: {folder} was trained by method '{saved}', not '{method}'; resume with "
                          f"train.method={saved}, or train '{method}' without --resume to start over")


def load(folder: Path, model, optimizer, scheduler, method: str | None = None) -> TrainState:
    """Restore a checkpoint into `model`, `optimizer` and `scheduler`; with `method`, refuse another method's."""
    if method is not None:
        check_method(folder, method)
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
