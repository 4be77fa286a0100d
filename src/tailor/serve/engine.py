"""The serving engine: one base model, many customizations of it, decoded together with continuous batching.

The engine knows nothing of HTTP. A caller asks `stream(model, messages, ...)` (chat) or `complete(model, prompt,
...)` (raw text) for a `Generation`, iterates it for text deltas, and reads `finish_reason`, the token counts and
the timings off it once the iteration ends; `close()` cancels it. `Engine` implements `protocol.ServingEngine`, as
the vLLM and llama.cpp engines of external.py do.

`Engine` turns a request into a prompt and hands it on; the work is done by three parts:
- customizations.py: the served names and their weights (LoRA adapters mixed per row, prompt-tuning / p-tuning
  virtual tokens and prompt-table rows, prefix-tuning keys and values, prompt profiles, whole models), added,
  replaced and removed while serving;
- scheduler.py: the one decode thread, the bounded queue, continuous batching (rows join and leave between steps);
- decoding.py: prefill, decoding steps, token choice with logprobs, speculative decoding by prompt lookup.
Any customization may be grounded (a folder with retrieval.json: `rag`, `raft`, retrieval.enabled): the request's
question is searched in the index, the passages are quoted in the prompt, and the Generation carries them for
citations; when retrieval finds nothing relevant the reply is the abstention, without decoding.
"""

from __future__ import annotations

import atexit
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tailor.errors import TailorError
from tailor.models.base import load_tokenizer, pick_dtype, resolve_base_model
from tailor.serve.customizations import BASE_ADAPTER, Customization, Customizations
from tailor.serve.decoding import Decoding, end_of_turn_ids, token_logprobs
from tailor.serve.protocol import (
    Generation,
    PromptTooLongError,
    QueueFullError,
    RetrievalUnavailableError,
    ServingEngine,
    TokenLogprobs,
    UnknownModelError,
    UnsupportedRequestError,
    outside_vocabulary,
)
from tailor.serve.sampling import Decoder
from tailor.serve.scheduler import Request, Scheduler

if TYPE_CHECKING:
    from tailor.methods.prompt import PromptProfile

__all__ = ["BASE_ADAPTER", "Engine", "Generation", "PromptTooLongError", "QueueFullError",
           "RetrievalUnavailableError", "TokenLogprobs", "UnknownModelError", "UnsupportedRequestError",
           "end_of_turn_ids", "outside_vocabulary", "token_logprobs"]

_ENGINES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_engines() -> None:
    """Stop decode threads before the interpreter tears down: a thread still holding its OpenMP pool when the C++
    runtime exits aborts the process ("terminate called without an active exception", exit 134)."""
    for engine in list(_ENGINES):
        engine.shutdown()


def default_speculative_tokens(dtype: torch.dtype, quantize: str) -> int:
    """Draft tokens per speculative step when serve.speculative_tokens is null. A step over more positions costs
    little where reading the weights bounds it, and more where the product's kernel is built for one row. Default
    model, 2 threads, one row (its step over 1 / 2 / 5 positions; the engine's tokens/s on 8 city questions with
    0 / 1 / 2 / 4 draft tokens): bf16 21.3 / 24.0 / 24.9 ms, 50.9 / 54.4 / 52.3 / 54.7; int8 12.4 / 12.0 / 19.1 ms,
    78.3 / 88.5 / 91.5 / 79.3; int4 9.1 / 10.9 / 15.9 ms, 99.4 / 107.3 / 101.4 / 94.0; float32 1.6-2x per step
    from 5 positions."""
    if torch.cuda.is_available():
        return 4
    if dtype == torch.float32:
        return 0
    return 4 if quantize == "none" else 1


class Engine(ServingEngine):
    kind = "tailor"
    supports_logprobs = True

    def __init__(self, base_model: str, adapters: dict[str, str] | None = None, base_name: str = "base",
                 dtype: torch.dtype | str | None = None, max_new_tokens: int = 256, system_prompt: str = "",
                 profiles: dict[str, PromptProfile] | None = None, *, max_batch_size: int = 16,
                 max_queue: int = 64, request_timeout: float | None = None, speculative_tokens: int | None = None,
                 answer_sentences: int | None = None, quantize: str = "none"):
        """`adapters` maps served names to folders: PEFT adapters (LoRA, prompt tuning, p-tuning, IA3, …), prompt
        profile folders, or whole model folders (a `full` run); `profiles` maps names to loaded prompt profiles.
        `speculative_tokens`: draft tokens a lone greedy request may check per step (prompt lookup); 0: off; None:
        `default_speculative_tokens`.
        `quantize`: "none", or "int8" / "int4" weight-only linear layers on a CPU (serve/quantize.py)."""
        if max_batch_size < 1 or max_queue < 0 or (speculative_tokens or 0) < 0:
            raise TailorError("serve: max_batch_size must be at least 1, max_queue and speculative_tokens at least 0")
        if not isinstance(dtype, torch.dtype):
            dtype = pick_dtype(dtype or "auto")
        self.dtype = dtype
        self.model_ref = resolve_base_model(base_model)
        self.tokenizer = load_tokenizer(self.model_ref)
        if not self.tokenizer.chat_template:
            raise TailorError(f"base_model: {base_model} has no chat template, so it cannot serve chat completions")
        self.base_name = base_name
        self.max_new_tokens = max_new_tokens
        self.answer_sentences = answer_sentences  # chat replies stop after this many sentences (None: no limit)
        # the workspace's system prompt is what the customized model was trained with; a client that sends
        # none gets it, one that sends its own keeps it
        self.system_prompt = system_prompt
        self.request_timeout = request_timeout
        if speculative_tokens is None:
            speculative_tokens = default_speculative_tokens(dtype, quantize)
        self.scheduler = Scheduler(max_batch_size, max_queue)
        _ENGINES.add(self)
        try:
            self.customizations = Customizations(self.model_ref, dtype, base_name, self.count_tokens,
                                                 self.scheduler.on_decode_thread, quantize)
            base = self.customizations.load_base()
            self.device = self.customizations.device
            self.context_length = getattr(base.config, "max_position_embeddings", None)
            self.end_of_turn_ids = end_of_turn_ids(self.tokenizer, getattr(base.generation_config, "eos_token_id",
                                                                           None))
            self.decoding = Decoding(self.customizations, self.tokenizer.pad_token_id, self.end_of_turn_ids,
                                     speculative_tokens)
            self.scheduler.attach(self.customizations, self.decoding)
            for name, folder in (adapters or {}).items():
                self.add_adapter(name, folder)
            for name, profile in (profiles or {}).items():
                self.customizations.add_profile(name, profile)
        except BaseException:
            self.shutdown()
            raise

    # ----- the served models -----

    def model_names(self) -> list[str]:
        return self.customizations.names()

    @property
    def revision(self) -> int:
        return self.customizations.revision

    def passage(self, chunk_id: str) -> dict | None:
        """A corpus chunk that a served model's index holds (what a citation's id points to), or None."""
        return self.customizations.passage(chunk_id)

    def add_adapter(self, name: str, folder: str | Path) -> None:
        """Serve `folder` (a PEFT adapter, a prompt profile folder, a rag folder or a whole model folder) as `name`.
        An existing name is replaced between two decoding steps: requests already running finish on the old
        version, new ones get the new one, and the old one is unloaded once no request uses it."""
        self.customizations.add(name, folder)

    def remove_adapter(self, name: str) -> None:
        """Stop serving `name`; requests already running finish first, then its weights are unloaded."""
        self.customizations.remove(name)

    def add_prompt_table(self, table: str | Path, tasks: list[str] | None = None) -> list[str]:
        """Serve rows of a run's prompt table (`prompt_table.safetensors`, see methods/p_tuning.py), each under its
        task name; returns the names added."""
        return self.customizations.add_prompt_table(table, tasks)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def outside_vocabulary(self, ids: list[int]) -> tuple[int, int] | None:
        return outside_vocabulary(ids, len(self.tokenizer))

    # ----- requests -----

    def stream(self, model: str, messages: list[dict], *, max_tokens: int | None = None, temperature: float = 1.0,
               top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
               timeout: float | None = None, logprobs: int | None = None) -> Generation:
        """Start a chat reply. Unknown models, over-long prompts and a full queue raise here, before any token."""
        custom = self.customizations.lookup(model)
        if self.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        if custom.kind == "profile":
            from tailor.methods.prompt import apply_profile

            # retrieving the examples embeds the question: a torch forward, so on the decode thread (between steps)
            messages = self.scheduler.on_decode_thread(lambda: apply_profile(custom.profile, messages))
        retrieval = None
        if custom.grounding is not None:
            retrieval = self._retrieve(custom.grounding, messages)
            if retrieval is not None and retrieval.abstain:
                answer = custom.grounding.settings.abstain_answer
                generation = Generation.finished_with(model, answer, self.count_tokens(answer))
                generation.retrieval, generation.grounding = retrieval, custom.grounding
                return generation
            messages = custom.grounding.ground(messages, retrieval)
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        generation = self._submit(model, custom, prompt_ids, max_tokens, temperature, top_p, stop, seed, timeout,
                                  "messages", sentences=self.answer_sentences, logprobs=logprobs)
        generation.retrieval, generation.grounding = retrieval, custom.grounding
        return generation

    def _retrieve(self, grounding, messages: list[dict]):
        """Search the customization's index for the last question, on the decode thread (embedding is a torch
        forward). A question over the passages' token budget is the request's fault; a failing index server is
        not."""
        from tailor.retrieval.grounding import last_question

        question = last_question(messages) or ""
        budget = grounding.settings.max_context_tokens
        if self.count_tokens(question) > budget:
            raise UnsupportedRequestError(f"messages: the question is {self.count_tokens(question)} tokens, over the "
                                          f"retrieval budget of {budget} (retrieval.max_context_tokens)",
                                          param="messages")
        try:
            return self.scheduler.on_decode_thread(lambda: grounding.retrieve(messages))
        except TailorError as exc:
            raise RetrievalUnavailableError(str(exc)) from None

    def complete(self, model: str, prompt: str | list[int], *, max_tokens: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
                 timeout: float | None = None, logprobs: int | None = None, echo: bool = False) -> Generation:
        """Continue raw text or token ids (no chat template, no system prompt), for /v1/completions. With `echo`
        and `logprobs`, the prompt's tokens are scored too (what lm-evaluation-harness's loglikelihood reads)."""
        custom = self.customizations.lookup(model)
        if custom.kind == "profile" or custom.grounding is not None:
            what = "a prompt profile" if custom.kind == "profile" else "grounded in retrieved passages"
            raise UnsupportedRequestError(f"model '{model}' is {what}: it builds chat conversations, so it "
                                          f"answers chat completions only")
        prompt_ids = list(prompt) if isinstance(prompt, list) else self.tokenizer(prompt)["input_ids"]
        if not prompt_ids:
            raise UnsupportedRequestError("prompt: must not be empty", param="prompt")
        outside = self.outside_vocabulary(prompt_ids)
        if outside is not None:
            raise UnsupportedRequestError(f"prompt: token id {outside[1]} is not in the vocabulary (0 to "
                                          f"{len(self.tokenizer) - 1})", param="prompt")
        return self._submit(model, custom, prompt_ids, max_tokens, temperature, top_p, stop, seed, timeout, "prompt",
                            sentences=None, logprobs=logprobs, prompt_logprobs=echo and logprobs is not None)

    def _submit(self, model: str, custom: Customization, prompt_ids: list[int], max_tokens: int | None,
                temperature: float, top_p: float, stop: list[str] | None, seed: int | None,
                timeout: float | None, field_name: str, sentences: int | None = None, logprobs: int | None = None,
                prompt_logprobs: bool = False) -> Generation:
        budget = max_tokens or self.max_new_tokens
        virtual = custom.virtual_tokens
        if self.context_length is not None:
            room = self.context_length - virtual - len(prompt_ids)
            if room < 1:
                raise PromptTooLongError(f"{field_name}: the {'conversation' if field_name == 'messages' else 'prompt'}"
                                         f" is {len(prompt_ids) + virtual} tokens; the model's context window is "
                                         f"{self.context_length}")
            budget = min(budget, room)
        generation = Generation(model, len(prompt_ids), on_close=self.scheduler.wake)
        timeout = timeout if timeout is not None else self.request_timeout
        request = Request(
            generation=generation, custom=custom, prompt_ids=prompt_ids,
            decoder=Decoder(self.tokenizer, self.end_of_turn_ids, budget, [s for s in stop or [] if s], sentences),
            temperature=temperature, top_p=top_p,
            generator=torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None,
            deadline=generation.created_at + timeout if timeout else None, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs)
        generation.token_times = request.decoder.token_times
        if logprobs is not None:
            generation.logprobs = []
        if prompt_logprobs:
            generation.prompt_ids = prompt_ids
        self.scheduler.submit(request)
        return generation

    # ----- load and lifetime -----

    @property
    def max_batch_size(self) -> int:
        return self.scheduler.max_batch_size

    @property
    def speculative_tokens(self) -> int:
        return self.decoding.speculative_tokens

    @property
    def peak_batch_size(self) -> int:
        """The most rows one decoding step has run, for tests and benchmarks."""
        return self.decoding.peak_batch_size

    @property
    def speculation(self) -> dict[str, int]:
        """Speculative steps, their draft tokens, and the draft tokens the replies kept."""
        return self.decoding.speculation

    def stats(self) -> dict:
        """Load figures for metrics and health checks."""
        return {**self.scheduler.stats(), "peak_batch_size": self.decoding.peak_batch_size,
                "speculation": dict(self.decoding.speculation)}

    def shutdown(self) -> None:
        """Stop the decode thread; unfinished requests end with finish_reason "cancelled"."""
        self.scheduler.shutdown()

    def close(self) -> None:
        self.shutdown()
