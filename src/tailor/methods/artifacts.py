"""Where a method's artifact lives in a run folder, and how it is loaded for training and for inference.

Every PEFT method saves a standard adapter folder `RUN/adapter/`, loaded on top of the base model; `full` saves a
complete model folder `RUN/model/` (safetensors weights + tokenizer); `prompt` builds a prompt profile `RUN/prompt/`
that changes the conversations, not the model; `rag` writes `RUN/rag/retrieval.json`, the base model answering
from retrieved passages. Any artifact folder holding retrieval.json (rag, raft, retrieval.enabled) is evaluated and
served with retrieval. Training, evaluation and `tailor methods` go through these helpers only, so a new kind of
artifact is taught here once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tailor.config import TailorConfig, dump_config
from tailor.errors import TailorError
from tailor.methods import registry
from tailor.methods.registry import Method
from tailor.models.base import load_model
from tailor.workspace import MANIFEST, atomic_dir, atomic_write_text, read_json

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
PROMPT_DIR = "prompt"
RAG_DIR = "rag"
ARTIFACT_DIRS = {"adapter": ADAPTER_DIR, "model": MODEL_DIR, "prompt": PROMPT_DIR, "rag": RAG_DIR}
# the file that tells a folder holds this kind of artifact
ARTIFACT_MARKERS = {"adapter": "adapter_config.json", "model": "config.json", "prompt": "profile.json",
                    "rag": "retrieval.json"}


def artifact_dir(run_dir: Path, method: Method) -> Path:
    return Path(run_dir) / ARTIFACT_DIRS[method.artifact]


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


@dataclass
class InferenceModels:
    """The base model and the run's customized one, as evaluation compares them."""

    method: str
    model: Any  # the customized model; the bare base when the run has no artifact yet (or for `prompt`)
    separate_base: Any = None  # `full`: the base loaded on its own; adapters switch theirs off instead
    has_artifact: bool = True
    profile: Any = None  # `prompt`: the PromptProfile that `method` applies to every conversation
    tokenizer: Any = None  # a "model" artifact's own tokenizer (from_scratch trains one); None: the base's
    grounding: Any = None  # retrieval.Grounding when the artifact answers from retrieved passages
    bare_base: bool = False  # `rag`: the customized model is the base itself, only its conversations differ

    def tokenizer_for(self, name: str, base_tokenizer):
        """The tokenizer model `name` reads and writes with: a model artifact's own, else the base's."""
        return self.tokenizer if name == self.method and self.tokenizer is not None else base_tokenizer

    @property
    def names(self) -> list[str]:
        return ["base", self.method] if self.has_artifact else ["base"]

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[Any]:
        """The model to run as `name` ("base" or the method), for the duration of the block."""
        if name not in self.names:
            raise KeyError(name)
        if name == "base" and self.separate_base is not None:
            yield self.separate_base
        elif name == "base" and self.has_artifact and self.profile is None and not self.bare_base:
            with self.model.disable_adapter():  # the same base weights, adapter off: no second copy in memory
                yield self.model
        else:
            yield self.model

    def messages_for(self, name: str, messages: list[dict]) -> list[dict]:
        """The conversation as model `name` sees it: with the prompt profile applied for `prompt`."""
        if name != self.method or self.profile is None:
            return messages
        from tailor.methods.prompt import apply_profile

        return apply_profile(self.profile, messages)


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
    options = config.method_options(method.name)
    load_options = method.load_options(options) if method.load_options else {}
    if method.artifact == "rag":
        # one model in memory: "base" and "rag" differ only in the passages put into the conversation
        base = load_model(base_ref, dtype=dtype).eval()
        return InferenceModels(method.name, base, has_artifact=(folder / ARTIFACT_MARKERS["rag"]).is_file(),
                               bare_base=True)
    if method.artifact == "prompt":
        from tailor.methods.prompt import PROFILE_FILE, load_profile

        base = load_model(base_ref, dtype=dtype).eval()
        if not (folder / PROFILE_FILE).is_file():
            return InferenceModels(method.name, base, has_artifact=False)
        # one model in memory: "base" and "prompt" differ only in the conversations they are given
        return InferenceModels(method.name, base, profile=load_profile(folder))
    if method.artifact == "model":
        base = load_model(base_ref, dtype=dtype).eval()
        if not (folder / "config.json").is_file():
            return InferenceModels(method.name, base, has_artifact=False)
        from tailor.models.base import load_tokenizer

        tokenizer = load_tokenizer(str(folder))
        if not own_tokenizers and tokenizer.get_vocab() != load_tokenizer(base_ref).get_vocab():
            raise TailorError(f"{folder}: this {method.name} model has its own tokenizer ({len(tokenizer)} tokens; "
                              f"the base has another), and this command reads every model with the base's tokens")
        return InferenceModels(method.name, load_model(str(folder), dtype=dtype).eval(), separate_base=base,
                               tokenizer=tokenizer)
    base = load_model(base_ref, dtype=dtype, **load_options)
    if not (folder / "adapter_config.json").is_file():
        return InferenceModels(method.name, base.eval(), has_artifact=False)
    import peft

    return InferenceModels(method.name, peft.PeftModel.from_pretrained(base, str(folder)).eval())
