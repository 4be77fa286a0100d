"""P-tuning: virtual-token embeddings predicted by a small prompt encoder (an MLP or an LSTM) while training
(Liu et al., 2021); afterwards the embeddings are computed once and the encoder is dropped.

The computed embeddings go into the run's *prompt table* (`RUN/prompt_table.safetensors`, one row
[num_virtual_tokens, hidden] per task name, indexed by `RUN/prompt_table.json`), so one base model holds many tasks
and adding a task never touches the others. The artifact is also written as a standard PEFT prompt-tuning adapter
built from the task's row, so evaluation and serving load it like any prompt-tuning adapter, with the same outputs
as the trained encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from tailor.errors import TailorError
from tailor.methods.registry import Method, MethodOptions, register, require_context_room
from tailor.workspace import atomic_path, now_iso, read_json, write_json

PROMPT_TABLE = "prompt_table.safetensors"
PROMPT_INDEX = "prompt_table.json"


class PTuningOptions(MethodOptions):
    num_virtual_tokens: int = Field(20, gt=0, description="Virtual tokens prepended to every input.")
    encoder_type: Literal["MLP", "LSTM"] = Field("MLP", description="Prompt encoder used while training.")
    encoder_hidden_size: int = Field(256, gt=0, description="Hidden width of the prompt encoder.")
    task_name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$", description=(
        "Row of the run's prompt table that receives this task's embeddings (letters, digits, _ . -)."))


def prepare(model, options: PTuningOptions):
    """Wrap the base model so that only the prompt encoder (and its input embeddings) train."""
    import peft  # imported here: it costs seconds, and loading a config must stay fast
    require_context_room(model, options.num_virtual_tokens, "methods.p_tuning.num_virtual_tokens")
    config = peft.PromptEncoderConfig(num_virtual_tokens=options.num_virtual_tokens, task_type="CAUSAL_LM",
                                      encoder_reparameterization_type=options.encoder_type,
                                      encoder_hidden_size=options.encoder_hidden_size)
    return peft.get_peft_model(model, config)


@torch.no_grad()
def virtual_token_embeddings(model) -> torch.Tensor:
    """Run the prompt encoder once: the embeddings it feeds the model, [num_virtual_tokens, hidden], fp32 on CPU."""
    was_training = model.training
    model.eval()  # no encoder dropout in the embeddings we keep
    try:
        return model.get_prompt_embedding_to_save(model.active_adapter).float().contiguous()
    finally:
        model.train(was_training)


def read_prompt_table(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The run's prompt table (task name -> [num_virtual_tokens, hidden]) and its index; empty when none yet."""
    run_dir = Path(run_dir)
    if not (run_dir / PROMPT_TABLE).is_file():
        return {}, {}
    return load_file(run_dir / PROMPT_TABLE), read_json(run_dir / PROMPT_INDEX)


def add_to_prompt_table(run_dir: Path, task: str, embeddings: torch.Tensor, base_model: str) -> None:
    """Add (or replace) one task's row; every other row is written back unchanged."""
    run_dir = Path(run_dir)
    rows, index = read_prompt_table(run_dir)
    for other, entry in index.items():
        if other != task and (entry["base_model"] != base_model or entry["shape"][1] != embeddings.shape[1]):
            raise TailorError(f"{run_dir / PROMPT_INDEX}: task '{other}' belongs to base model {entry['base_model']} "
                              f"(hidden size {entry['shape'][1]}); one prompt table holds tasks of one base model "
                              f"(this run: {base_model}, hidden size {embeddings.shape[1]}). Use another run folder.")
    rows[task] = embeddings.detach().float().cpu().contiguous()
    index[task] = {"shape": list(embeddings.shape), "num_virtual_tokens": int(embeddings.shape[0]),
                   "base_model": base_model, "updated_at": now_iso()}
    # table first, index second: an index entry never points at a row that is not on disk
    with atomic_path(run_dir / PROMPT_TABLE) as tmp:
        save_file(rows, tmp)
    write_json(run_dir / PROMPT_INDEX, index)


def write_prompt_tuning_adapter(folder: Path, embeddings: torch.Tensor, trained) -> None:
    """A standard PEFT prompt-tuning adapter whose prompt embeddings are `embeddings` (no encoder inside)."""
    import peft  # imported here: it costs seconds, and loading a config must stay fast
    config = peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=trained.num_virtual_tokens, token_dim=trained.token_dim,
        num_transformer_submodules=trained.num_transformer_submodules, num_attention_heads=trained.num_attention_heads,
        num_layers=trained.num_layers, base_model_name_or_path=trained.base_model_name_or_path,
        prompt_tuning_init="RANDOM", inference_mode=True)
    config.save_pretrained(str(folder))
    # the key PEFT's loader expects for the prompt embedding of every prompt-learning method
    save_file({"prompt_embeddings": embeddings.contiguous()}, Path(folder) / "adapter_model.safetensors")


def save(model, folder: Path, run_dir: Path, options: PTuningOptions) -> None:
    """Compute the virtual tokens once, keep them in the prompt table, and write them as a prompt-tuning adapter."""
    trained = model.peft_config[model.active_adapter]
    embeddings = virtual_token_embeddings(model)  # [num_virtual_tokens, hidden]
    add_to_prompt_table(run_dir, options.task_name, embeddings, trained.base_model_name_or_path)
    write_prompt_tuning_adapter(folder, embeddings, trained)


register(Method(name="p_tuning", options=PTuningOptions, prepare=prepare, save=save, artifact="adapter",
                summary="Prompt encoder (MLP/LSTM) trains virtual tokens, then is dropped; one prompt-table row "
                        "per task."))
