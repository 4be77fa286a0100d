"""One registry of customization methods. A method module calls `register(Method(...))` once at import.

The registry rejects unknown and duplicate names, so `tailor train --method`, the search and the evaluation all see
the same set, and adding a method touches one module and its test. Every module of the tailor.methods package is
either a method (listed in METHOD_MODULES, registering the method of its own name) or a helper (HELPER_MODULES);
anything else stops the first lookup with one message, so a method never silently fails to load.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tailor.errors import TailorError

# Modules imported on first use, in cheapest-to-costliest order (the order `tailor methods` lists them in).
METHOD_MODULES = ("prompt", "rag", "prompt_tuning", "p_tuning", "prefix_tuning", "ia3", "lora", "raft", "full",
                  "continued_pretraining", "distill", "from_scratch",
                  "reward", "dpo", "kto", "ppo", "grpo")
# Modules of the package that register no method: this registry and what several methods share.
HELPER_MODULES = frozenset({"registry", "artifacts", "kinds", "alignment", "graders"})


@dataclass
class TrainContext:
    """What a method's `tokenizer` and `phases` hooks see of the run being trained."""

    config: Any  # TailorConfig
    root: Path  # the workspace folder (relative paths in options resolve against it)
    run_dir: Path
    base_ref: str  # the resolved base model
    compute_dtype: Any  # torch.dtype
    options: Any  # the method's typed options


@dataclass
class Phase:
    """One stretch of training with its own data and loss (e.g. corpus blocks, then chat records)."""

    name: str
    train_examples: list  # tailor.train.examples.Example
    eval_examples: list
    loss_fn: Callable | None = None  # None: cross-entropy on the label tokens (the training core's loss_sum)
    max_steps: int | None = None  # None: train.max_steps / train.epochs
    epochs: float | None = None


class MethodOptions(BaseModel):
    """Base of every method's options: typed, defaulted, documented, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def option_keys(cls) -> list[str]:
        """Every option by its dotted key under `methods.<name>` (nested options as `lora.r`), e.g. for tune.space."""
        keys = []
        for name, field in cls.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, MethodOptions):
                keys += [f"{name}.{key}" for key in annotation.option_keys()]
            else:
                keys.append(name)
        return keys


@dataclass(frozen=True)
class Method:
    name: str
    options: type[MethodOptions]
    summary: str
    # prepare(model, options) -> model whose trainable parameters are the ones this method trains
    prepare: Callable[[Any, Any], Any] | None = None
    # False: no weights change; `build` writes the artifact instead of the training loop (no optimizer, no checkpoints)
    trains: bool = True
    # the kind of artifact it leaves in the run (methods/kinds.py): "adapter" (a PEFT folder RUN/adapter/), "model"
    # (a complete model RUN/model/), "prompt" (a prompt profile RUN/prompt/), "rag" (RUN/rag/ with only
    # retrieval.json), "reward" (RUN/reward/: a scalar head)
    artifact: str = "adapter"
    # artifact_for(options) -> the artifact kind when the options decide it (DPO: LoRA adapter or full model);
    # read through `artifacts.run_method`, which resolves it for a run
    artifact_for: Callable[[Any], str] | None = None
    # load_options(options) -> extra `from_pretrained` keyword arguments for the base (e.g. 4-bit quantization).
    # It runs before any weight is read, so incompatible options stop here with one clear message.
    load_options: Callable[[Any], dict] | None = None
    # save(model, folder, run_dir, options) writes the artifact into `folder` (a temporary folder, renamed into
    # place afterwards); None means `model.save_pretrained(folder)`
    save: Callable[[Any, Path, Path, Any], None] | None = None
    # build(conversations, folder, options, workspace_system_prompt) -> examples used: writes the artifact of a
    # method that trains nothing from the training chat records, into a temporary folder renamed into place
    build: Callable[[list[list[dict]], Path, Any, str], int] | None = None
    # False: `build` needs no training records (rag answers from the index)
    needs_data: bool = True
    # True: the artifact answers from retrieved passages whatever retrieval.enabled says (raft); its folder gets
    # retrieval.json, so eval and serve retrieve for it
    grounded: bool = False
    # tokenizer(ctx: TrainContext) -> the tokenizer the data is encoded with and a "model" artifact is saved with;
    # None: the base model's (from_scratch trains its own; distill uses its student's)
    tokenizer: Callable[[TrainContext], Any] | None = None
    # create(base_ref, dtype, options) -> the model `prepare` starts from; None: the base model as loaded
    create: Callable[[str, Any, Any], Any] | None = None
    # phases(ctx, tokenizer) -> the training phases in order; None: one phase of chat records from RUN/data.
    # It runs before the model loads, so a missing corpus or a block longer than the context stops early.
    phases: Callable[[TrainContext, Any], list[Phase]] | None = None
    # frozen_base(options) -> True when the base weights stay frozen and can be stored in the compute dtype
    # (bf16 on fast CPUs); None: True for "adapter" artifacts, False otherwise
    frozen_base: Callable[[Any], bool] | None = None
    # run(config, root, run_dir, show_progress=, should_stop=) -> TrainResult: a method with its own loop and data
    # (DPO through TRL, PPO, the reward model) trains and saves its artifact itself; `prepare` is then unused
    run: Callable[..., Any] | None = None
    # the train.* keys the method uses; None: all of them. A key it does not use, set to anything but its default,
    # stops the run with one message instead of being silently ignored
    train_keys: frozenset[str] | None = None


# what the methods on the one core use when they bring their own data and loss (reward, dpo, kto): everything but
# packing, which joins chat records into rows; and what the rollout methods (ppo, grpo) use: their iterations,
# rollout and mini-batch sizes replace steps, epochs and batch size, and they have no eval set
PAIR_TRAIN_KEYS = frozenset({"method", "epochs", "max_steps", "learning_rate", "batch_size", "grad_accum",
                             "warmup_ratio", "scheduler", "weight_decay", "max_grad_norm", "dtype", "seed",
                             "save_every", "log_every", "eval_every", "early_stopping_patience",
                             "gradient_checkpointing", "compile", "report_to"})
ROLLOUT_TRAIN_KEYS = frozenset({"method", "learning_rate", "grad_accum", "warmup_ratio", "scheduler", "weight_decay",
                                "max_grad_norm", "dtype", "seed", "save_every", "log_every", "report_to"})


def check_train_keys(method: Method, train) -> None:
    """train.* keys the method would ignore, set away from their defaults: one message naming the first."""
    if method.train_keys is None:
        return
    defaults = type(train)()
    unused = [key for key in type(train).model_fields
              if key not in method.train_keys and getattr(train, key) != getattr(defaults, key)]
    if unused:
        raise TailorError(f"train.{unused[0]}: method '{method.name}' does not use it (it uses train."
                          f"{', train.'.join(sorted(method.train_keys - {'method'}))}); remove it or set it back to "
                          f"{getattr(defaults, unused[0])!r} for this run")


_METHODS: dict[str, Method] = {}
_loaded = False


def register(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method '{method.name}' is already registered")
    _METHODS[method.name] = method
    return method


def method_modules() -> set[str]:
    """The method modules found in the tailor.methods package: every module but the helpers."""
    import tailor.methods

    return {info.name for info in pkgutil.iter_modules(tailor.methods.__path__)} - HELPER_MODULES


def check_modules(found: set[str]) -> None:
    """The package's method modules are exactly METHOD_MODULES (found by listing the package, like PEFT's
    mapping of method names, so a new module cannot be forgotten)."""
    unlisted = sorted(found - set(METHOD_MODULES))
    if unlisted:
        raise TailorError(f"tailor.methods.{unlisted[0]}: a module of the methods package that is neither in "
                          f"METHOD_MODULES (the methods, in the order `tailor methods` lists them) nor in "
                          f"HELPER_MODULES (modules that register no method), both in methods/registry.py")
    absent = sorted(set(METHOD_MODULES) - found)
    if absent:
        raise TailorError(f"METHOD_MODULES lists '{absent[0]}', but the methods package has no module of that name")


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True  # first: a method module may look another method up while it is imported
    try:
        check_modules(method_modules())
        for module in METHOD_MODULES:
            importlib.import_module(f"tailor.methods.{module}")
            if module not in _METHODS:
                raise TailorError(f"tailor.methods.{module}: registers no method named '{module}' (a method module "
                                  f"calls register(Method(name='{module}', ...)) once at import; a module that is "
                                  f"not a method belongs in HELPER_MODULES)")
    except Exception:
        _loaded = False  # every later lookup fails the same way, not on a half-filled registry
        raise


def names() -> list[str]:
    """Cheapest first, whatever order the modules happened to be imported in."""
    _load_all()
    order = {module: i for i, module in enumerate(METHOD_MODULES)}
    return sorted(_METHODS, key=lambda name: order.get(name, len(order)))


def get(name: str, key: str = "method") -> Method:
    _load_all()
    if name not in _METHODS:
        raise TailorError(f"{key}: unknown method '{name}' (available: {', '.join(names())})")
    return _METHODS[name]


def require_modules(model, names: list[str], key: str) -> None:
    """Stop with one clear message when a method targets module names the model does not have."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} - {""}
    missing = [name for name in names if name not in present]
    if missing:
        raise TailorError(f"{key}: the model has no module named {', '.join(missing)} "
                          f"(it has e.g. {', '.join(sorted(n for n in present if not n.isdigit())[:8])})")


def require_context_room(model, virtual_tokens: int, key: str) -> None:
    """Virtual tokens take positions in the context window; a prompt that fills it leaves no room for the input."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and virtual_tokens >= context:
        raise TailorError(f"{key}: {virtual_tokens} virtual tokens do not fit the model's context of {context} "
                          f"tokens with room for the input")
