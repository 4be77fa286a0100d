"""Train: the candidate, continued from the production version's LoRA adapter.

SFT on the corrections is the training core's plain SFT loop (train/loop.py) on a policy loaded from the production
adapter (methods/alignment.py `load_policy`, as dpo and kto start from an SFT adapter); `methods.lora` has no
option to start from an adapter, so the composition lives here. KTO and DPO then run as the registered methods,
each starting from the adapter the step before wrote (`init_adapter`). Every step writes a run folder
(CYCLE/sft, CYCLE/kto, CYCLE/dpo) with its manifest; the last one is the candidate. A grounded production's
retrieval.json goes into the candidate's adapter (improve/documents.py: the cycle's updated index, when the
documents changed).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from tailor.config import TailorConfig
from tailor.errors import TailorError
from tailor.improve.documents import production_grounding, retrieval_index
from tailor.methods.kinds import ADAPTER
from tailor.registry.tables import ModelVersion
from tailor.retrieval.grounding import RETRIEVAL_FILE
from tailor.workspace import MANIFEST, write_json


def improve_config(config: TailorConfig, method: str, methods: dict | None = None) -> TailorConfig:
    """The workspace config with improve.train over train: and the step's method and its options."""
    train = config.improve_train().model_copy(update={"method": method})
    update: dict[str, Any] = {"train": train}
    if methods:
        update["methods"] = {**config.methods, **methods}
    return config.model_copy(update=update)


def production_adapter(production: ModelVersion) -> Path:
    folder = ADAPTER.in_run(production.run_dir)
    if not ADAPTER.holds(folder):
        raise TailorError(f"{production.label} ({production.method}) has no LoRA adapter in {folder}; improve "
                          f"continues a LoRA adapter (lora, dpo, kto runs), so train production with one of those")
    return folder


def train_sft(config: TailorConfig, root: Path, start: Path, data: Path, run_dir: Path, *,
              show_progress: bool) -> dict:
    from tailor.methods.alignment import load_policy, record_training, save_adapter
    from tailor.models.base import load_tokenizer, pick_dtype, resolve_base_model
    from tailor.train.checkpoint import run_record
    from tailor.train.loop import seed_everything, train
    from tailor.train.run import load_chat_examples

    step_config = improve_config(config, "lora")
    cfg = step_config.train
    base_ref = resolve_base_model(config.base_model, root=root)
    tokenizer = load_tokenizer(base_ref)
    examples = load_chat_examples(data, tokenizer)
    dtype = pick_dtype(cfg.dtype)
    seed_everything(cfg.seed)
    model = load_policy(base_ref, dtype, str(start), root, "improve", step_config.method_options("lora"),
                        keep_reference=False)
    result = train(model, examples, [], cfg, run_dir, pad_id=tokenizer.pad_token_id, compute_dtype=dtype,
                   show_progress=show_progress, run=run_record("lora", step_config), description="improve: sft")
    artifact = save_adapter(model, run_dir, step_config)
    record_training(run_dir, step_config, "lora", base_ref, dtype, [data], artifact, result.to_dict())
    return {"steps": result.steps, "train_loss": result.train_loss, "seconds": round(result.seconds, 1)}


def train_method(config: TailorConfig, root: Path, method: str, start: Path, data: Path, run_dir: Path, *,
                 show_progress: bool) -> dict:
    """KTO or DPO through its registered method, from the adapter at `start`."""
    from tailor.train.loop import TrainResult
    from tailor.train.run import run_training

    option = {"kto": "examples_file", "dpo": "preference_file"}[method]
    options = {**config.methods.get(method, {}), "init_adapter": str(start), option: str(data)}
    step_config = improve_config(config, method, {method: options})
    result = run_training(step_config, root, run_dir, show_progress=show_progress)
    if not isinstance(result, TrainResult):  # kto and dpo train; only methods that train nothing build
        raise AssertionError(f"improve: {method} built an artifact instead of training")
    return {"steps": result.steps, "train_loss": result.train_loss, "seconds": round(result.seconds, 1)}


def train_candidate(config: TailorConfig, root: Path, production: ModelVersion, cycle_dir: Path, counts: dict,
                    documents: dict, *, show_progress: bool, say) -> dict:
    """Run the configured steps; returns {"candidate": run folder, "steps": {name: figures}}. A grounded production
    makes a grounded candidate, answering from the cycle's updated index when the documents changed; changed
    documents without feedback to learn from make a candidate of production's adapter on the new index."""
    improve = config.improve
    start = production_adapter(production)
    plan = [(name, path) for name, wanted, path in (
        ("sft", improve.sft, cycle_dir / "data" / "train.jsonl"),
        ("kto", improve.kto, cycle_dir / "data" / "unpaired.jsonl"),
        ("dpo", improve.dpo, cycle_dir / "data" / "preferences.jsonl")) if wanted]
    needed = {"sft": 1, "kto": 2, "dpo": 1}
    plan = [(name, path) for name, path in plan if counts.get(name, 0) >= needed[name]]
    grounding = production_grounding(production)
    if not plan and documents.get("index"):
        run_dir = cycle_dir / "documents-only"
        shutil.rmtree(run_dir, ignore_errors=True)
        say(f"no feedback to train on: {production.label}'s adapter answering from the updated index")
        shutil.copytree(start, ADAPTER.in_run(run_dir))
        shutil.copy2(Path(production.run_dir) / MANIFEST, run_dir / MANIFEST)
        ground(ADAPTER.in_run(run_dir), grounding, documents)
        return {"candidate": str(run_dir), "steps": {}}
    if not plan:
        raise TailorError("improve: nothing to train on (no corrections for sft, fewer than 2 rated answers for "
                          "kto, no pairs for dpo); enable another step or collect more feedback")
    steps: dict[str, dict] = {}
    for name, data in plan:
        run_dir = cycle_dir / name
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted step starts over: its inputs are the same
        say(f"training {name} on {counts[name]} records from {start}")
        if name == "sft":
            steps[name] = train_sft(config, root, start, data, run_dir, show_progress=show_progress)
        else:
            steps[name] = train_method(config, root, name, start, data, run_dir, show_progress=show_progress)
        start = ADAPTER.in_run(run_dir)
    ground(ADAPTER.in_run(run_dir), grounding, documents)
    return {"candidate": str(run_dir), "steps": steps}


def ground(adapter: Path, grounding: tuple[Path, dict] | None, documents: dict) -> None:
    """Production's retrieval.json in the candidate's adapter folder, naming the cycle's updated index when the
    documents changed, else production's own index (by absolute path: the candidate lives elsewhere)."""
    if grounding is None:
        return
    folder, retrieval = grounding
    index = Path(documents["index"]) if documents.get("index") else retrieval_index(folder, retrieval)
    write_json(adapter / RETRIEVAL_FILE, {**retrieval, "index": os.path.relpath(index, adapter),
                                          "index_absolute": str(index)})
