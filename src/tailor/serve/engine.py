"""The serving engine: one base model, any number of LoRA adapters on it, any number of prompt profiles (the
base model given few-shot conversations, see methods/prompt.py), and a token-by-token decode loop.

The engine knows nothing of HTTP. A caller asks `stream(model, messages, ...)` for a `Generation`, iterates it for
text deltas, and reads `finish_reason` and the token counts off it once the iteration ends.

One lock guards the model: a request holds it from its first token to its last, so requests run one at a time.
The lock is taken inside the generator, so a reply nobody iterates holds nothing, and closing a half-read reply
(a client that disconnected) releases it at once.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tailor.errors import TailorError
from tailor.models.base import load_model, load_tokenizer, pick_dtype, resolve_base_model

if TYPE_CHECKING:
    from tailor.methods.prompt import PromptProfile


class UnknownModelError(TailorError):
    """The request named a model this engine does not serve."""


class PromptTooLongError(TailorError):
    """The conversation alone fills the model's context window."""


class Generation(Iterator[str]):
    """One reply being generated. Iterating yields text deltas; when it ends, `finish_reason` is "stop" (end of
    turn or a stop string) or "length" (max_tokens or the context window), and `completion_tokens` is final."""

    def __init__(self, model: str, prompt_tokens: int):
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._deltas: Iterator[str] = iter(())

    def __next__(self) -> str:
        return next(self._deltas)

    def text(self) -> str:
        """Run to the end and return the whole reply."""
        return "".join(self)

    def close(self) -> None:
        """Stop generating now (e.g. the client went away); frees the model for the next request."""
        self._deltas.close()


class Engine:
    def __init__(self, base_model: str, adapters: dict[str, str] | None = None, base_name: str = "base",
                 dtype: torch.dtype | str | None = None, max_new_tokens: int = 256, system_prompt: str = "",
                 profiles: dict[str, PromptProfile] | None = None):
        adapters = adapters or {}
        self.profiles = dict(profiles or {})
        if base_name in adapters:
            raise TailorError(f"serve: the adapter name '{base_name}' is taken by the base model; rename it")
        for name in self.profiles:
            if name == base_name or name in adapters:
                raise TailorError(f"serve: the prompt profile name '{name}' is taken by "
                                  f"{'the base model' if name == base_name else 'an adapter'}; rename it")
        for name, folder in adapters.items():
            if not (Path(folder) / "adapter_config.json").is_file():
                raise TailorError(f"serve: adapter '{name}': {folder} is not a PEFT adapter folder "
                                  f"(no adapter_config.json)")
        if not isinstance(dtype, torch.dtype):
            dtype = pick_dtype(dtype or "auto")

        model_ref = resolve_base_model(base_model)
        self.tokenizer = load_tokenizer(model_ref)
        if not self.tokenizer.chat_template:
            raise TailorError(f"base_model: {base_model} has no chat template, so it cannot serve chat completions")
        model = load_model(model_ref, dtype=dtype)
        # PEFT keeps adapters in module dicts, whose keys cannot contain "."; users name theirs freely, so the
        # engine uses its own keys
        self._adapter_keys = {name: f"adapter{i}" for i, name in enumerate(adapters)}
        if adapters:
            import peft

            for i, (name, folder) in enumerate(adapters.items()):
                key = self._adapter_keys[name]
                if i == 0:
                    model = peft.PeftModel.from_pretrained(model, folder, adapter_name=key)
                else:
                    model.load_adapter(folder, adapter_name=key)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.base_name = base_name
        self.max_new_tokens = max_new_tokens
        # the workspace's system prompt is what the customized model was trained with; a client that sends
        # none gets it, one that sends its own keeps it
        self.system_prompt = system_prompt
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self.end_of_turn_ids = self._end_of_turn_ids()
        self._lock = threading.Lock()

    def model_names(self) -> list[str]:
        return [self.base_name, *self._adapter_keys, *self.profiles]

    def stream(self, model: str, messages: list[dict], *, max_tokens: int | None = None, temperature: float = 1.0,
               top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None) -> Generation:
        """Start a chat reply. Unknown models and over-long prompts raise here, before any token is generated."""
        if model not in self.model_names():
            raise UnknownModelError(f"model '{model}' does not exist; this server has {', '.join(self.model_names())}")
        if self.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        if model in self.profiles:
            from tailor.methods.prompt import apply_profile

            # outside the model lock: retrieving the examples embeds the question on the CPU
            messages = apply_profile(self.profiles[model], messages)
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        budget = max_tokens or self.max_new_tokens
        if self.context_length is not None:
            room = self.context_length - len(prompt_ids)
            if room < 1:
                raise PromptTooLongError(f"messages: the conversation is {len(prompt_ids)} tokens; the model's "
                                         f"context window is {self.context_length}")
            budget = min(budget, room)
        generation = Generation(model, len(prompt_ids))
        generation._deltas = self._decode(generation, prompt_ids, budget, temperature, top_p,
                                          [s for s in stop or [] if s], seed)
        return generation

    def _decode(self, generation: Generation, prompt_ids: list[int], max_tokens: int, temperature: float,
                top_p: float, stop: list[str], seed: int | None) -> Iterator[str]:
        dev = self.device
        generator = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        with self._lock, self._select(generation.model):
            input_ids = torch.tensor([prompt_ids], device=dev)  # [1, prompt]; then [1, 1] per step
            past, generated, text, emitted = None, [], "", ""
            while True:
                if len(generated) == max_tokens:
                    generation.finish_reason = "length"
                    break
                # inference_mode per step, not around the loop: grad mode is per thread, and a streamed reply
                # may be resumed on a different worker thread for each token
                with torch.inference_mode():
                    out = self.model(input_ids=input_ids, past_key_values=past, use_cache=True, logits_to_keep=1)
                    token = _pick(out.logits[0, -1].float(), temperature, top_p, generator)  # logits: [vocab]
                past = out.past_key_values
                if token in self.end_of_turn_ids:
                    generation.finish_reason = "stop"
                    break
                generated.append(token)
                generation.completion_tokens = len(generated)
                input_ids = torch.tensor([[token]], device=dev)

                # decode the whole reply each step: a character split over two tokens only appears once both are in
                text = self.tokenizer.decode(generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                cut = _first_stop(text, stop)
                if cut is not None:
                    if cut > len(emitted):
                        yield text[len(emitted):cut]
                    generation.finish_reason = "stop"
                    return
                # hold back a half-decoded character and any tail that may grow into a stop string
                safe = text.rstrip("\ufffd")
                ready = len(safe) - _stop_prefix_length(safe, stop)
                if ready > len(emitted) and text.startswith(emitted):
                    yield text[len(emitted):ready]
                    emitted = text[:ready]
            if len(text) > len(emitted):  # the end of the reply: what was held back is final now
                yield text[len(emitted):]

    def _select(self, model: str):
        """Route the forward pass through one adapter, or through none for the base model and prompt profiles."""
        if not self._adapter_keys:
            return contextlib.nullcontext()
        if model == self.base_name or model in self.profiles:
            return self.model.disable_adapter()
        self.model.set_adapter(self._adapter_keys[model])
        return contextlib.nullcontext()

    def _end_of_turn_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        # chat templates end an assistant turn with their own marker, which is not always the tokenizer's eos
        for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
            token = self.tokenizer.convert_tokens_to_ids(marker)
            if isinstance(token, int) and token != self.tokenizer.unk_token_id:
                ids.add(token)
        return {i for i in ids if i is not None}


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise sample from the smallest set of tokens whose mass reaches top_p."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)  # [vocab]
    probs, order = probs.sort(descending=True)
    probs[(probs.cumsum(-1) - probs) >= top_p] = 0  # a token stays if the mass before it is under top_p
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(order[choice])


def _first_stop(text: str, stop: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _stop_prefix_length(text: str, stop: list[str]) -> int:
    """Length of the longest tail of `text` that is the start of some stop string."""
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
