"""Artifact kinds: what a method leaves in a run folder, each defined once.

A kind says where it lives in a run (`folder`), how a folder is recognised as holding one (`marker`), how
evaluation loads it, how a serving engine loads it, which `tailor export` formats apply, and which files the
registry checksums. Evaluation, serving, export, the registry and the CLI ask the kind (`KINDS[name]`,
`kind_of(folder)`); nobody else looks for adapter_config.json. A new kind of artifact is one entry here.
Anchor: PEFT maps `peft_type` to its config and model classes in one table.

| kind         | folder           | marker                  | what it is                                          |
|--------------|------------------|-------------------------|-----------------------------------------------------|
| reward       | reward/          | reward.json             | a scalar head on the base (scores answers)          |
| prompt       | prompt/          | profile.json            | a few-shot prompt profile applied to conversations  |
| adapter      | adapter/         | adapter_config.json     | a PEFT adapter on the base                          |
| model        | model/           | config.json             | a whole model (full, distill, from_scratch …)        |
| rag          | rag/             | retrieval.json          | only retrieval settings: the base answers grounded  |
| prompt_table | (the run folder) | prompt_table.safetensors| p-tuning's per-task virtual tokens                  |

Detection goes in that order, because markers overlap: a reward folder is a PEFT folder too, and any folder may
hold retrieval.json (raft's adapter, a prompt profile with retrieval on).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from tailor.errors import TailorError
from tailor.models.base import load_model


class ServingLoader(Protocol):
    """What an engine offers a kind to load itself into (serve/customizations.py implements it); each returns the
    engine's own description of the served name."""

    def load_peft(self, name: str, folder: Path) -> Any: ...

    def load_profile(self, name: str, folder: Path) -> Any: ...

    def load_whole_model(self, name: str, folder: Path) -> Any: ...

    def load_grounded_base(self, name: str, folder: Path) -> Any: ...


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


@dataclass(frozen=True)
class EvalLoad:
    """What loading a run's artifact for evaluation needs."""

    config: Any  # TailorConfig (tailor.config reads the method registry, which reads the kinds)
    method: str
    folder: Path  # the artifact folder in the run (it may not exist yet)
    base_ref: str
    dtype: torch.dtype
    load_options: dict  # extra from_pretrained arguments for the base (QLoRA's 4-bit)
    own_tokenizers: bool  # the caller reads a model artifact with its own tokenizer


@dataclass(frozen=True)
class ArtifactKind:
    name: str
    folder: str  # where a run keeps it ("" : files at the run folder's top)
    marker: str  # the file whose presence says a folder holds this kind
    summary: str  # in the user's words, for messages: "a PEFT adapter folder"
    # a chat model that evaluation, serving and compare can run (a reward head scores answers instead)
    generates: bool = True
    # the `tailor export --format` values that apply to it
    exports: tuple[str, ...] = ()
    # load_for_eval(EvalLoad) -> InferenceModels (has_artifact False when the folder holds none yet)
    load_for_eval: Callable[[EvalLoad], InferenceModels] | None = None
    # load_for_serving(engine's loader, served name, folder) -> the engine's customization
    load_for_serving: Callable[[ServingLoader, str, Path], Any] | None = None
    # load_weights(folder, base_ref, dtype) -> the model as training left it (export's reference and merge source)
    load_weights: Callable[[Path, str, torch.dtype], Any] | None = None
    # files at the run folder's top that belong to the kind (a prompt table is two files, no folder)
    run_files: tuple[str, ...] = ()

    def holds(self, folder: Path | str) -> bool:
        """Whether `folder` holds an artifact of this kind (by its marker file)."""
        return (Path(folder) / self.marker).is_file()

    def in_run(self, run_dir: Path | str) -> Path:
        """Where a run keeps this kind."""
        return Path(run_dir) / self.folder if self.folder else Path(run_dir)

    def files(self, run_dir: Path | str) -> list[Path]:
        """Every file of the run's artifact of this kind, for checksums (dot-files are half-written temporaries)."""
        run_dir = Path(run_dir)
        if not self.folder:
            return [run_dir / name for name in self.run_files if (run_dir / name).is_file()]
        folder = run_dir / self.folder
        return [path for path in sorted(folder.rglob("*")) if path.is_file() and not path.name.startswith(".")] \
            if folder.is_dir() else []


# ---- evaluation loaders ----

def _eval_adapter(load: EvalLoad) -> InferenceModels:
    base = load_model(load.base_ref, dtype=load.dtype, **load.load_options)
    if not ADAPTER.holds(load.folder):
        return InferenceModels(load.method, base.eval(), has_artifact=False)
    import peft

    return InferenceModels(load.method, peft.PeftModel.from_pretrained(base, str(load.folder)).eval())


def _eval_model(load: EvalLoad) -> InferenceModels:
    from tailor.models.base import load_tokenizer

    base = load_model(load.base_ref, dtype=load.dtype).eval()
    if not MODEL.holds(load.folder):
        return InferenceModels(load.method, base, has_artifact=False)
    tokenizer = load_tokenizer(str(load.folder))
    if not load.own_tokenizers and tokenizer.get_vocab() != load_tokenizer(load.base_ref).get_vocab():
        raise TailorError(f"{load.folder}: this {load.method} model has its own tokenizer ({len(tokenizer)} "
                          f"tokens; the base has another), and this command reads every model with the base's tokens")
    return InferenceModels(load.method, load_model(str(load.folder), dtype=load.dtype).eval(), separate_base=base,
                           tokenizer=tokenizer)


def _eval_prompt(load: EvalLoad) -> InferenceModels:
    from tailor.methods.prompt import load_profile

    # one model in memory: "base" and "prompt" differ only in the conversations they are given
    base = load_model(load.base_ref, dtype=load.dtype).eval()
    if not PROMPT.holds(load.folder):
        return InferenceModels(load.method, base, has_artifact=False)
    return InferenceModels(load.method, base, profile=load_profile(load.folder))


def _eval_rag(load: EvalLoad) -> InferenceModels:
    # one model in memory: "base" and "rag" differ only in the passages put into the conversation
    base = load_model(load.base_ref, dtype=load.dtype).eval()
    return InferenceModels(load.method, base, has_artifact=RAG.holds(load.folder), bare_base=True)


# ---- weights as training left them ----

def _adapter_weights(folder: Path, base_ref: str, dtype: torch.dtype):
    import peft

    return peft.PeftModel.from_pretrained(load_model(base_ref, dtype=dtype), str(folder)).eval()


def _model_weights(folder: Path, base_ref: str, dtype: torch.dtype):
    return load_model(str(folder), dtype=dtype).eval()


# the export formats that write weights (models/export.py); "prompt" copies prompt-learning artifacts
WEIGHT_FORMATS = ("merged", "int8", "gguf", "gguf-q8_0")

REWARD = ArtifactKind(
    "reward", "reward", "reward.json", "a reward model (reward.json and head.safetensors)",
    generates=False)
PROMPT = ArtifactKind(
    "prompt", "prompt", "profile.json", "a prompt profile (profile.json)", exports=("prompt",),
    load_for_eval=_eval_prompt, load_for_serving=lambda loader, name, folder: loader.load_profile(name, folder))
ADAPTER = ArtifactKind(
    "adapter", "adapter", "adapter_config.json", "a PEFT adapter folder (adapter_config.json)",
    exports=(*WEIGHT_FORMATS, "prompt"), load_for_eval=_eval_adapter,
    load_for_serving=lambda loader, name, folder: loader.load_peft(name, folder), load_weights=_adapter_weights)
MODEL = ArtifactKind(
    "model", "model", "config.json", "a model folder (config.json)", exports=WEIGHT_FORMATS,
    load_for_eval=_eval_model, load_for_serving=lambda loader, name, folder: loader.load_whole_model(name, folder),
    load_weights=_model_weights)
RAG = ArtifactKind(
    "rag", "rag", "retrieval.json", "a rag folder (retrieval.json)", load_for_eval=_eval_rag,
    load_for_serving=lambda loader, name, folder: loader.load_grounded_base(name, folder))
PROMPT_TABLE = ArtifactKind(
    "prompt_table", "", "prompt_table.safetensors", "a p-tuning prompt table (prompt_table.safetensors)",
    exports=("prompt",), run_files=("prompt_table.safetensors", "prompt_table.json"))

# in detection order (see the module docstring)
KINDS: dict[str, ArtifactKind] = {kind.name: kind for kind in (REWARD, PROMPT, ADAPTER, MODEL, RAG, PROMPT_TABLE)}


def get_kind(name: str) -> ArtifactKind:
    if name not in KINDS:
        raise TailorError(f"unknown artifact kind '{name}' (known: {', '.join(KINDS)})")
    return KINDS[name]


def kind_of(folder: Path | str) -> ArtifactKind | None:
    """The kind an artifact folder holds (the first whose marker it has), or None."""
    return next((kind for kind in KINDS.values() if kind.folder and kind.holds(folder)), None)


def servable_kinds() -> str:
    """What a served folder may be, for messages."""
    served = sorted((kind for kind in KINDS.values() if kind.load_for_serving is not None),
                    key=lambda kind: kind is not ADAPTER)  # the usual answer first
    kinds = [kind.summary for kind in served]
    return ", ".join(kinds[:-1]) + " or " + kinds[-1]


def serving_kind(folder: Path | str, where: str) -> ArtifactKind:
    """The kind of a folder to serve, or one message naming `where` and what a served folder may be."""
    kind = kind_of(folder)
    if kind is None:
        raise TailorError(f"{where}: {folder} is not {servable_kinds()}")
    if kind.load_for_serving is None:
        raise TailorError(f"{where}: {folder} holds {kind.summary}, which is not served as a chat model")
    return kind


def run_folders() -> list[str]:
    """The folders a run may keep artifacts in."""
    return [kind.folder for kind in KINDS.values() if kind.folder]


def run_artifact_files(run_dir: Path | str) -> list[Path]:
    """Every artifact file of a run, over all kinds: what the registry checksums."""
    return [path for kind in KINDS.values() for path in kind.files(run_dir)]
