"""The models one engine serves: the base model's weights, and every customization of it under its served name.

A served name means one of:
- "base": the base model itself (also a rag folder without weights of its own: the base, grounded);
- "lora": a LoRA adapter loaded into the base's PeftModel, picked per row with `adapter_names` (see
  `adapter_args`: a batch whose rows agree runs the plain forward with that adapter active instead);
- "soft_prompt": prompt-tuning / p-tuning virtual tokens, or a row of a run's prompt table, prepended at prefill;
- "prefix": prefix-tuning keys and values per layer, the row's first cache entries;
- "profile": a prompt profile (methods/prompt.py), the base model given few-shot conversations;
- "model": weights of its own (IA3, DoRA or another adapter PEFT cannot mix per row, merged into a copy of the
  base; or a `full` run's model folder), decoded as its own batch.
Any of them may be grounded (a folder with retrieval.json).

Names are added, replaced and removed while serving: a replaced or removed customization is retired, and its weights
are unloaded once the last request holding it has finished.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tailor.errors import TailorError
from tailor.methods.kinds import ADAPTER
from tailor.models.base import load_model
from tailor.serve.attention import use_cpu_decode_attention
from tailor.serve.protocol import UnknownModelError
from tailor.serve.quantize import quantize_linears

if TYPE_CHECKING:
    from tailor.methods.prompt import PromptProfile

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass(eq=False)
class Customization:
    """What a served model name means to the decoder."""

    kind: str  # "base", "lora", "soft_prompt", "prefix", "profile" or "model" (its own weights)
    backbone: str = "base"  # which loaded model decodes it
    adapter_key: str = BASE_ADAPTER  # the PEFT adapter of a LoRA row
    soft_prompt: torch.Tensor | None = None  # [virtual tokens, hidden], prepended at prefill
    prefix: list | None = None  # prefix tuning: per layer (keys, values), each [kv_heads, virtual tokens, head_dim]
    profile: Any = None  # PromptProfile
    grounding: Any = None  # retrieval.Grounding: retrieve per request, quote the passages, cite the answer
    folder: str | None = None
    requests: int = 0  # requests holding it; a replaced one is unloaded when this reaches 0
    retired: bool = False

    @property
    def virtual_tokens(self) -> int:
        """Context positions its soft prompt or prefix takes before the prompt."""
        if self.soft_prompt is not None:
            return self.soft_prompt.shape[0]
        return self.prefix[0][0].shape[1] if self.prefix is not None else 0


class Customizations:
    """The served names and the weights behind them. Weights are loaded with `on_decode_thread` (see
    scheduler.Scheduler.on_decode_thread); `lock` is held by the decode thread for a whole step and here while
    weights change, so a customization is swapped between steps, never during one."""

    def __init__(self, model_ref: str, dtype: torch.dtype, base_name: str, count_tokens: Callable[[str], int],
                 on_decode_thread: Callable[[Callable[[], Any]], Any], quantize: str = "none"):
        self.model_ref = model_ref
        self.dtype = dtype
        # "int8" / "int4": every loaded model's linear layers keep their weights as integer codes (quantize.py);
        # LoRA adapters stay in `dtype` on top of them
        self.quantize = quantize
        self.base_name = base_name
        self.count_tokens = count_tokens
        self.on_decode_thread = on_decode_thread
        self.lock = threading.RLock()
        self.backbones: dict[str, Any] = {}  # loaded models: "base" and one per customization with its own weights
        self.models: dict[str, Customization] = {base_name: Customization("base")}
        self.lora_route: str | None = None  # how the LoRA layers are set: an adapter key, BASE_ADAPTER, "mixed"
        # bumped whenever a served name changes what it answers with: cached answers of the old version go stale
        self.revision = 0
        self._retired: list[Customization] = []
        self._keys = (f"adapter{i}" for i in itertools.count())

    def load_base(self) -> Any:
        base = self.on_decode_thread(lambda: self._for_serving(load_model(self.model_ref, dtype=self.dtype).eval()))
        self.backbones["base"] = base
        self.device: torch.device = next(base.parameters()).device
        return base

    def names(self) -> list[str]:
        return list(self.models)

    def lookup(self, name: str) -> Customization:
        custom = self.models.get(name)
        if custom is None:
            raise UnknownModelError(f"model '{name}' does not exist; this server has {', '.join(self.names())}")
        return custom

    def passage(self, chunk_id: str) -> dict | None:
        """A corpus chunk that a served model's index holds (what a citation's id points to), or None."""
        for custom in list(self.models.values()):
            if custom.grounding is not None:
                index = custom.grounding.retriever.index
                if chunk_id in index.position:
                    return index.chunks[index.position[chunk_id]]
        return None

    # ----- adding, replacing and removing names -----

    def add(self, name: str, folder: str | Path) -> None:
        """Serve `folder` (a PEFT adapter, a prompt profile folder, a rag folder or a whole model folder) as `name`.
        An existing name is replaced between two decoding steps: requests already running finish on the old
        version, new ones get the new one, and the old one is unloaded once no request uses it."""
        self._check_name(name)
        folder = Path(folder)
        custom = self.on_decode_thread(lambda: self._load(name, folder))
        self._put(name, custom)

    def add_profile(self, name: str, profile: PromptProfile) -> None:
        if name in self.models:
            raise TailorError(f"serve: the prompt profile name '{name}' is taken by "
                              f"{'the base model' if name == self.base_name else 'an adapter'}; rename it")
        self.models[name] = Customization("profile", profile=profile)

    def add_prompt_table(self, table: str | Path, tasks: list[str] | None = None) -> list[str]:
        """Serve rows of a run's prompt table (`prompt_table.safetensors`, see methods/p_tuning.py), each under its
        task name; returns the names added."""
        from safetensors.torch import load_file

        device = self.device
        rows = self.on_decode_thread(lambda: {task: row.to(device, self.dtype)
                                              for task, row in load_file(str(table)).items()})
        hidden = self.backbones["base"].get_input_embeddings().weight.shape[1]
        names = tasks if tasks is not None else sorted(rows)
        for task in names:
            if task not in rows:
                raise TailorError(f"serve: {table} has no task '{task}' (it has {', '.join(sorted(rows))})")
            if rows[task].dim() != 2 or rows[task].shape[1] != hidden:
                raise TailorError(f"serve: {table}: task '{task}' has width {rows[task].shape[-1]}, the base model "
                                  f"{hidden}; the table belongs to another base model")
        for task in names:
            self._check_name(task)
            with self.lock:
                old = self.models.get(task)
                self.models[task] = Customization("soft_prompt", soft_prompt=rows[task], folder=str(table))
                if old is not None:
                    self._retire(old)
        return names

    def remove(self, name: str) -> None:
        """Stop serving `name`; requests already running finish first, then its weights are unloaded."""
        if name == self.base_name:
            raise TailorError(f"serve: the base model '{name}' cannot be removed")
        with self.lock:
            self.lookup(name)
            self._retire(self.models.pop(name))
            self.revision += 1

    def _put(self, name: str, custom: Customization) -> None:
        with self.lock:
            old = self.models.get(name)
            self.models[name] = custom
            self.revision += 1
            if old is not None:
                self._retire(old)

    def _check_name(self, name: str) -> None:
        if not name or not isinstance(name, str):
            raise TailorError("serve: a model name must be a non-empty string")
        if name == self.base_name:
            raise TailorError(f"serve: the adapter name '{name}' is taken by the base model; rename it")

    def _retire(self, custom: Customization) -> None:
        custom.retired = True
        self._retired.append(custom)
        self.unload_retired()

    def unload_retired(self) -> None:
        """Free the weights of replaced or removed customizations that no request uses any more."""
        with self.lock:
            for custom in [c for c in self._retired if c.requests == 0]:
                self._retired.remove(custom)
                if custom.kind == "lora":
                    base = self.backbones["base"]
                    self.lora_route = None
                    base.delete_adapter(custom.adapter_key)
                    if not base.peft_config:  # PEFT cannot run with no adapter at all: back to the plain model
                        self.backbones["base"] = base.unload()
                    elif base.active_adapter not in base.peft_config:
                        base.set_adapter(next(iter(base.peft_config)))
                elif custom.kind == "model":
                    del self.backbones[custom.backbone]

    # ----- per batch -----

    def adapter_args(self, model, adapter_keys: list[str]) -> dict:
        """Route a batch (its rows' `adapter_key`s) through its LoRA adapters. PEFT's per-row path
        (`adapter_names`) splits every projection by adapter, which made a decoding step 1.2-1.8x slower than the
        plain forward even when all rows agree (default model, 4 adapters loaded, 1 and 8 rows); so a batch whose
        rows all use one adapter, or none, runs the plain forward with that adapter active, or with the adapter
        layers off."""
        import peft

        if not isinstance(model, peft.PeftModel):
            return {}
        route = adapter_keys[0] if len(set(adapter_keys)) == 1 else "mixed"
        if route != self.lora_route:  # switching walks every module: only when the batch's route changes
            tuner = model.base_model
            if not isinstance(tuner, peft.tuners.tuners_utils.BaseTuner):
                raise TypeError(f"a served LoRA model wraps a PEFT tuner, not a {type(tuner).__name__}")
            if route == BASE_ADAPTER:
                tuner.disable_adapter_layers()
            else:
                tuner.enable_adapter_layers()
                if route != "mixed":
                    model.set_adapter(route, inference_mode=True)
            self.lora_route = route
        return {"adapter_names": adapter_keys} if route == "mixed" else {}

    # ----- loading (on the decode thread) -----

    def _load(self, name: str, folder: Path) -> Customization:
        """The customization in `folder` as its artifact kind loads it (methods/kinds.py), with its retrieval when
        the folder holds retrieval.json."""
        from tailor.methods.kinds import serving_kind
        from tailor.retrieval.grounding import Grounding

        kind = serving_kind(folder, f"serve: adapter '{name}'")
        assert kind.load_for_serving is not None  # serving_kind refuses kinds that are not served
        custom = kind.load_for_serving(self, name, folder)
        custom.grounding = Grounding.load(folder, self.count_tokens)
        return custom

    # ----- the ServingLoader protocol: what each artifact kind loads itself into -----

    def load_grounded_base(self, name: str, folder: Path) -> Customization:
        """A rag folder: the base model itself, answering from retrieved passages."""
        return Customization("base", folder=str(folder))

    def load_profile(self, name: str, folder: Path) -> Customization:
        from tailor.methods.prompt import load_profile

        return Customization("profile", profile=load_profile(folder), folder=str(folder))

    def load_whole_model(self, name: str, folder: Path) -> Customization:
        model = self._for_serving(load_model(str(folder), dtype=self.dtype).eval())
        if model.config.vocab_size != self.backbones["base"].config.vocab_size:
            raise TailorError(f"serve: model '{name}': {folder} has another vocabulary than the base model; "
                              f"serve it with its own `tailor serve`")
        return self._own_backbone(model, folder)

    def load_peft(self, name: str, folder: Path) -> Customization:
        """A PEFT adapter: LoRA rows beside the base, virtual tokens or prefixes per row, or anything else PEFT
        cannot mix per row merged into its own copy of the base."""
        import peft

        config = json.loads((folder / ADAPTER.marker).read_text(encoding="utf-8"))
        kind = config.get("peft_type")
        if kind in ("PROMPT_TUNING", "P_TUNING"):
            return Customization("soft_prompt", soft_prompt=self._virtual_tokens(name, folder), folder=str(folder))
        if kind == "PREFIX_TUNING":
            return Customization("prefix", prefix=self._prefix(name, folder, config), folder=str(folder))
        if kind == "LORA" and not config.get("use_dora"):
            with self.lock:
                key = next(self._keys)
                try:
                    base = self.backbones["base"]
                    self.lora_route = None  # loading changes the active adapter
                    if isinstance(base, peft.PeftModel):
                        base.load_adapter(str(folder), adapter_name=key, is_trainable=False)
                        # rows pick adapters with adapter_names, but PEFT's forward looks up the active one
                        base.set_adapter(key)
                    else:
                        self.backbones["base"] = peft.PeftModel.from_pretrained(base, str(folder), adapter_name=key,
                                                                                is_trainable=False).eval()
                except (ValueError, KeyError, RuntimeError, OSError) as exc:
                    raise TailorError(f"serve: adapter '{name}': {folder} does not fit the base model "
                                      f"({str(exc).splitlines()[0]})") from None
            return Customization("lora", adapter_key=key, folder=str(folder))
        # IA3, DoRA and other adapters PEFT cannot mix per row: folded into their own copy of the base
        base = load_model(self.model_ref, dtype=self.dtype)
        try:
            merged = self._for_serving(peft.PeftModel.from_pretrained(base, str(folder)).merge_and_unload().eval())
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise TailorError(f"serve: adapter '{name}': {folder} does not fit the base model "
                              f"({str(exc).splitlines()[0]})") from None
        return self._own_backbone(merged, folder)

    def _for_serving(self, model):
        """A loaded model as the engine runs it: its linear layers quantized as configured, and attention that is
        fast for a decoding step on a CPU (attention.py)."""
        return use_cpu_decode_attention(quantize_linears(model, self.quantize))

    def _own_backbone(self, model, folder: Path) -> Customization:
        key = next(self._keys)
        with self.lock:
            self.backbones[key] = model
        return Customization("model", backbone=key, folder=str(folder))

    def _virtual_tokens(self, name: str, folder: Path) -> torch.Tensor:
        from safetensors.torch import load_file

        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise TailorError(f"serve: adapter '{name}': {weights} is missing")
        tensors = load_file(str(weights))
        embeddings = tensors.get("prompt_embeddings")
        hidden = self.backbones["base"].get_input_embeddings().weight.shape[1]
        if embeddings is None or embeddings.dim() != 2 or embeddings.shape[1] != hidden:
            raise TailorError(f"serve: adapter '{name}': {weights} holds no prompt embeddings of width {hidden} "
                              f"(the base model's hidden size)")
        return embeddings.to(self.device, self.dtype)

    def _prefix(self, name: str, folder: Path, config: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A prefix-tuning adapter's keys and values per layer, laid out as PEFT's `get_prompt` lays them out."""
        from safetensors.torch import load_file

        weights = folder / "adapter_model.safetensors"
        prefix = load_file(str(weights)).get("prompt_embeddings") if weights.is_file() else None
        layers, heads = config.get("num_layers"), config.get("num_attention_heads")
        model_config = self.backbones["base"].config
        if (prefix is None or heads is None or layers != model_config.num_hidden_layers
                or config.get("num_transformer_submodules", 1)
                != 1 or prefix.shape[-1] != layers * 2 * config.get("token_dim", 0)):
            raise TailorError(f"serve: adapter '{name}': {folder} is not a prefix-tuning adapter of this base model")
        virtual = prefix.shape[0]
        # [virtual, layers * 2 * token_dim] -> [layers * 2, heads, virtual, head_dim]; even rows keys, odd values
        kv = prefix.view(virtual, layers * 2, heads, -1).permute(1, 2, 0, 3).to(self.device, self.dtype)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]
