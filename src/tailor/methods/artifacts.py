"""Where a method's artifact lives in a run folder, and how it is loaded for training and for inference.

Every PEFT method saves a standard adapter folder `RUN/adapter/`, loaded on top of the base model; `full` saves a
complete model folder `RUN/model/` (safetensors weights + tokenizer); `prompt` builds a prompt profile `RUN/prompt/`
that changes the conversations, not the model; `rag` writes `RUN/rag/retrieval.json`, the base model answering
from retrieved passages. Any artifact folder holding retrieval.json (rag, raft, retrieval.enabled) is evaluated and
served with retrieval. What each kind of artifact is, and how it loads, is defined once in `kinds.py`; training,
evaluation and `tailor methods` go through these helpers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from tailor.config import TailorConfig, dump_config
from tailor.errors import TailorError
from tailor.methods import registry
from tailor.methods.kinds import EvalLoad, InferenceModels, get_kind
from tailor.methods.registry import Method
from tailor.models.base import load_model
from tailor.workspace import MANIFEST, atomic_dir, atomic_write_text, read_json


def artifact_dir(run_dir: Path, method: Method) -> Path:
    """Where the run keeps the method's artifact (its kind's folder)."""
    return get_kind(method.artifact).in_run(run_dir)


def load_for_training(config: TailorConfig, base_ref: str, compute_dtype: torch.dtype, name: str | None = None):
    """The base model prepared by the method: only the weights it trains require grad, and those are fp32."""
    method = registry.get(name or config.train.method, key="train.method")
    if not method.trains:
        raise TailorError(f"train.method: {method.name} trains no weights; its artifact is built from the training "
                          f"data (see build_artifact)")
    options = config.method_options(method.name)
    # before any weight is read, so incompatible options (QLoRA without CUDA) stop here
    load_options = method.load_options(options) if method.load_options else {}
    # frozen base weights are stored in the compute dtype (half the memory in bf16); weights that train stay fp32
    # for the optimizer, and autocast runs the matrix multiplies in the compute dtype
    frozen = method.frozen_base(options) if method.frozen_base else method.artifact == "adapter"
    dtype = compute_dtype if frozen else torch.float32
    start = method.create(base_ref, dtype, options) if method.create else load_model(base_ref, dtype=dtype,
                                                                                        **load_options)
    assert method.prepare is not None, f"{method.name} trains in its own loop (Method.run), not through prepare"
    model = method.prepare(start, options)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def grounded(config: TailorConfig, method: Method) -> bool:
    """Whether the method's artifact answers from retrieved passages (rag and raft always, others with
    retrieval.enabled)."""
    return method.grounded or method.artifact == "rag" or config.retrieval.enabled


@contextlib.contextmanager
def _artifact_folder(target: Path, config: TailorConfig, method: Method | None = None,
                     root: Path | None = None) -> Iterator[Path]:
    """A temporary folder beside `target`, renamed into place with the resolved config once the block succeeds:
    a crash never leaves half a folder. A grounded method's folder also gets retrieval.json (checked first: no
    index, no artifact)."""
    with atomic_dir(target) as tmp:
        if method is not None and grounded(config, method):
            from tailor.retrieval.grounding import write_retrieval_file

            write_retrieval_file(tmp, config, root or Path.cwd(), Path(target).parent)
        yield tmp
        atomic_write_text(tmp / "tailor.yaml", dump_config(config))


def save_artifact(model, tokenizer, run_dir: Path, config: TailorConfig, root: Path | None = None) -> Path:
    """Write a trained method's artifact with the resolved config beside it."""
    method = registry.get(config.train.method, key="train.method")
    target = artifact_dir(run_dir, method)
    with _artifact_folder(target, config, method, root) as tmp:
        if method.save is not None:
            method.save(model, tmp, Path(run_dir), config.method_options(method.name))
        else:
            model.save_pretrained(tmp)
        if method.artifact == "model":
            tokenizer.save_pretrained(tmp)  # a model folder must load on its own
    return target


def save_whole_model(model, folder: Path, run_dir: Path, options) -> None:
    """A `save` for "model" artifacts trained through adapters: the adapters folded into a copy of the weights, so
    the folder loads with plain `from_pretrained` and the model in memory keeps training-time structure."""
    import copy

    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(folder)


def build_artifact(conversations: list[list[dict]], run_dir: Path, config: TailorConfig,
                   root: Path | None = None) -> tuple[Path, int]:
    """Build the artifact of a method that trains nothing from the training chat records; returns its folder and
    the number of examples it holds."""
    method = registry.get(config.train.method, key="train.method")
    target = artifact_dir(run_dir, method)
    with _artifact_folder(target, config, method, root) as tmp:
        assert method.build is not None, f"{method.name} declares no build for its artifact"
        examples = method.build(conversations, tmp, config.method_options(method.name), config.system_prompt)
    return target, examples


def trained_method(config: TailorConfig, run_dir: Path) -> str:
    """The method the run was last trained with (its manifest), else the configured one.

    `tailor train --method p_tuning` followed by a plain `tailor eval` must evaluate p_tuning, not the method
    tailor.yaml names: every PEFT method writes the same adapter folder.
    """
    manifest = Path(run_dir) / MANIFEST
    trained = read_json(manifest).get("stages", {}).get("train", {}) if manifest.is_file() else {}
    return trained.get("method") or config.train.method


def run_method(config: TailorConfig, run_dir: Path) -> Method:
    """The method that trained the run, with its artifact kind as that run's options decide it."""
    import dataclasses

    method = registry.get(trained_method(config, run_dir), key="train.method")
    if method.artifact_for is None:
        return method
    return dataclasses.replace(method, artifact=method.artifact_for(config.method_options(method.name)))


def load_for_inference(config: TailorConfig, run_dir: Path, base_ref: str, dtype: torch.dtype, *,
                       own_tokenizers: bool = False) -> InferenceModels:
    """Load the run's artifact (see `trained_method`) and the base it is compared with, in eval mode.

    A model artifact with its own vocabulary (from_scratch) must be read with `InferenceModels.tokenizer_for`;
    a caller that says so passes `own_tokenizers=True`, any other stops with one message instead of feeding it the
    base's token ids."""
    method = run_method(config, run_dir)
    folder = artifact_dir(run_dir, method)
    models = _load_artifact(config, run_dir, method, folder, base_ref, dtype, own_tokenizers)
    if models.has_artifact:
        from tailor.models.base import load_tokenizer
        from tailor.retrieval.grounding import Grounding

        tokenizer = models.tokenizer or load_tokenizer(base_ref)
        models.grounding = Grounding.load(folder, lambda text: len(tokenizer(text, add_special_tokens=False)
                                                                   ["input_ids"]))
    return models


def _load_artifact(config: TailorConfig, run_dir: Path, method: Method, folder: Path, base_ref: str,
                   dtype: torch.dtype, own_tokenizers: bool) -> InferenceModels:
    kind = get_kind(method.artifact)
    if kind.load_for_eval is None:
        raise TailorError(f"{method.name}: its artifact ({kind.summary}) is not a chat model to evaluate")
    options = config.method_options(method.name)
    load_options = method.load_options(options) if method.load_options else {}
    return kind.load_for_eval(EvalLoad(config, method.name, folder, base_ref, dtype, load_options, own_tokenizers))
