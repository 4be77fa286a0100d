"""Optional engines that implement `tailor.serve.protocol.ServingEngine`, as the built-in `Engine` does, for when a
faster runtime is installed:

- `VllmEngine`: vLLM's async engine (GPU): paged attention, continuous batching, multi-LoRA (`serve.engine: vllm`);
- `LlamaCppEngine`: llama.cpp on a GGUF file (CPU), one request at a time (`serve.engine: llama_cpp`).

Each imports its package only when constructed, so tailor imports and runs without them. Prompt profiles,
prompt-tuning adapters, logprobs and per-request timeouts are the built-in engine's; these engines declare what they
lack (`supports_logprobs = False`) and refuse it.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from abc import abstractmethod
from pathlib import Path
from typing import Any

import torch

from tailor.errors import TailorError
from tailor.methods.kinds import ADAPTER
from tailor.serve.decoding import end_of_turn_ids
from tailor.serve.protocol import (
    Generation,
    PromptTooLongError,
    ServingEngine,
    UnknownModelError,
    UnsupportedRequestError,
    outside_vocabulary,
)
from tailor.serve.sampling import Decoder, pick


def _require(package: str, pip_name: str, key: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise TailorError(f"serve.engine: {key} needs the package {pip_name} (pip install {pip_name})") from None


class _ThreadedEngine(ServingEngine):
    """Shared parts: the served names, and a Generation fed from a worker."""

    kind: str
    _adapters: dict[str, Any]  # served name -> what the engine needs to answer with it (set by each engine)
    base_name = "base"
    revision = 0  # bumped when a served name changes what it answers with (vLLM's add_adapter on a taken name)
    supports_logprobs = False
    tokenizer: Any  # set by each engine's __init__
    system_prompt: str

    def passage(self, chunk_id: str) -> dict | None:
        """External engines serve no retrieval: no passage to show."""
        return None

    def model_names(self) -> list[str]:
        return [self.base_name, *self._adapters]

    def outside_vocabulary(self, ids: list[int]) -> tuple[int, int] | None:
        return outside_vocabulary(ids, len(self.tokenizer))

    def stats(self) -> dict:
        return {}  # the runtime keeps its own queue: no figures of tailor's

    def _check(self, model: str) -> None:
        if model not in self.model_names():
            raise UnknownModelError(f"model '{model}' does not exist; this server has {', '.join(self.model_names())}")

    def _no_logprobs(self, logprobs: int | None, echo: bool) -> None:
        if logprobs is not None or echo:
            raise UnsupportedRequestError(f"logprobs: not available from serve.engine {self.kind}; the built-in "
                                          f"engine (serve.engine: tailor) returns them", param="logprobs")

    def complete(self, model: str, prompt: str | list[int], *, max_tokens: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, stop: list[str] | None = None,
                 seed: int | None = None, timeout: float | None = None, logprobs: int | None = None,
                 echo: bool = False) -> Generation:
        self._check(model)
        self._no_logprobs(logprobs, echo)
        if not isinstance(prompt, str):
            raise UnsupportedRequestError(f"prompt: token ids are not accepted by serve.engine {self.kind}; send "
                                          f"text", param="prompt")
        return self._start(model, {"prompt": prompt}, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                           stop=stop, seed=seed, timeout=timeout)

    def stream(self, model: str, messages: list[dict], *, max_tokens: int | None = None, temperature: float = 1.0,
               top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
               timeout: float | None = None, logprobs: int | None = None) -> Generation:
        self._check(model)
        self._no_logprobs(logprobs, False)
        if self.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return self._start(model, {"messages": messages}, max_tokens=max_tokens, temperature=temperature,
                           top_p=top_p, stop=stop, seed=seed, timeout=timeout)

    @abstractmethod
    def _start(self, model: str, request: dict, *, max_tokens: int | None, temperature: float, top_p: float,
               stop: list[str] | None, seed: int | None, timeout: float | None) -> Generation:
        """Start one request on the engine's own thread (vLLM's event loop, llama.cpp's worker)."""


class VllmEngine(_ThreadedEngine):
    """vLLM's AsyncLLM on its own event loop thread; LoRA adapters become per-request `LoRARequest`s."""

    kind = "vllm"

    def __init__(self, base_model: str, adapters: dict[str, str] | None = None, max_new_tokens: int = 256,
                 system_prompt: str = "", max_batch_size: int = 16, **_):
        vllm = _require("vllm", "vllm", "vllm")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest

        self._lora_request = LoRARequest
        self._vllm = vllm
        self.max_new_tokens, self.system_prompt = max_new_tokens, system_prompt
        self._adapters: dict[str, object] = {}
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="tailor-vllm", daemon=True).start()
        args = AsyncEngineArgs(model=base_model, enable_lora=True, max_num_seqs=max_batch_size, max_loras=8)
        self._engine = vllm.AsyncLLMEngine.from_engine_args(args)
        self.tokenizer = asyncio.run_coroutine_threadsafe(self._engine.get_tokenizer(), self._loop).result()
        for name, folder in (adapters or {}).items():
            self.add_adapter(name, folder)

    def add_adapter(self, name: str, folder: str | Path) -> None:
        if not ADAPTER.holds(folder):
            raise TailorError(f"serve: adapter '{name}': {folder} is not {ADAPTER.summary}; the vLLM engine serves "
                              f"LoRA adapters only")
        self._adapters[name] = self._lora_request(name, next(self._ids), str(folder))
        self.revision += 1  # a replaced name must not answer from the response cache of its old weights

    def remove_adapter(self, name: str) -> None:
        self._check(name)
        self._adapters.pop(name)
        self.revision += 1

    def close(self) -> None:
        self._engine.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)

    def _start(self, model: str, request: dict, *, max_tokens=None, temperature=1.0, top_p=1.0, stop=None,
               seed=None, timeout=None) -> Generation:
        prompt = request.get("prompt") or self.tokenizer.apply_chat_template(
            request["messages"], add_generation_prompt=True, tokenize=False)
        params = self._vllm.SamplingParams(max_tokens=max_tokens or self.max_new_tokens, temperature=temperature,
                                           top_p=top_p, stop=stop or None, seed=seed)
        generation = Generation(model, len(self.tokenizer(prompt)["input_ids"]))
        request_id = f"tailor-{next(self._ids)}"

        async def run() -> None:
            sent = ""
            try:
                async for out in self._engine.generate(prompt, params, request_id,
                                                       lora_request=self._adapters.get(model)):
                    if generation.cancelled:
                        await self._engine.abort(request_id)
                        generation.finish_reason = "cancelled"
                        break
                    choice = out.outputs[0]
                    if choice.text[len(sent):]:
                        generation.push(choice.text[len(sent):])
                        sent = choice.text
                    generation.completion_tokens = len(choice.token_ids)
                    generation.finish_reason = choice.finish_reason
            except Exception as exc:  # noqa: BLE001 - handed to the reader
                generation.push_error(exc)
            generation.end()

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        if timeout:
            self._loop.call_soon_threadsafe(self._loop.call_later, timeout, future.cancel)
        return generation


class LlamaCppEngine(_ThreadedEngine):
    """llama.cpp on a GGUF file (CPU), one request at a time: llama.cpp computes the logits (through
    `tailor.models.gguf`'s C-API reader, the prebuilt build `make setup` installs), and the built-in engine's
    sampling and text assembly (`tailor.serve.sampling`) pick tokens and cut stop strings, so temperature, top_p,
    seed and stop behave as on the built-in engine. The chat template and detokenizer come from the GGUF file
    itself (transformers reads its tokenizer metadata)."""

    kind = "llama_cpp"

    def __init__(self, base_model: str, adapters: dict[str, str] | None = None, max_new_tokens: int = 256,
                 system_prompt: str = "", context_length: int = 2048, threads: int | None = None, **_):
        from tailor.models.gguf import _llama_cpp_cffi_path

        if _llama_cpp_cffi_path() is None:
            raise TailorError("serve.engine: llama_cpp needs the package llama-cpp-cffi (`make setup` installs it)")
        path = Path(base_model)
        if path.suffix != ".gguf" or not path.is_file():
            raise TailorError(f"base_model: the llama_cpp engine needs a .gguf file (found {base_model})")
        if adapters:
            raise TailorError("serve.engine: llama_cpp serves the GGUF model alone; export the customized model "
                              "to GGUF and serve that file")
        from transformers import AutoTokenizer

        from tailor.models.gguf import LlamaCppCffiGGUF

        self._llm: LlamaCppCffiGGUF | None = LlamaCppCffiGGUF(path, n_ctx=context_length, threads=threads)
        self.tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        self.end_of_turn_ids = end_of_turn_ids(self.tokenizer)
        self._adapters: dict[str, str] = {}
        self.max_new_tokens, self.system_prompt, self.context_length = max_new_tokens, system_prompt, context_length
        self._lock = threading.Lock()

    def add_adapter(self, name: str, folder: str | Path) -> None:
        raise UnsupportedRequestError("serve.engine llama_cpp does not load adapters at runtime", param="name")

    def remove_adapter(self, name: str) -> None:
        self._check(name)

    def close(self) -> None:
        with self._lock:  # after the reply being decoded; llama.cpp frees the model when the reader is collected
            self._llm = None

    def _start(self, model: str, request: dict, *, max_tokens=None, temperature=1.0, top_p=1.0, stop=None,
               seed=None, timeout=None) -> Generation:
        if self._llm is None:
            raise TailorError("serve: the engine has stopped")
        text = request.get("prompt") or self.tokenizer.apply_chat_template(
            request["messages"], add_generation_prompt=True, tokenize=False)
        prompt_ids = self._llm.tokenize(text)
        room = self.context_length - len(prompt_ids)
        if room < 1:
            field = "prompt" if "prompt" in request else "messages"
            raise PromptTooLongError(f"{field}: the prompt is {len(prompt_ids)} tokens; the model's context window "
                                     f"is {self.context_length}")
        decoder = Decoder(self.tokenizer, self.end_of_turn_ids, min(max_tokens or self.max_new_tokens, room),
                          [s for s in stop or [] if s])
        generation = Generation(model, len(prompt_ids))
        generation.token_times = decoder.token_times
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        deadline = generation.created_at + timeout if timeout else None

        def run() -> None:
            try:
                with self._lock:
                    llm = self._llm
                    if llm is None:
                        raise TailorError("the llama.cpp engine is closed")
                    logits = llm.start(prompt_ids)
                    while True:
                        token = pick(torch.from_numpy(logits), temperature, top_p, generator)
                        delta, reason = decoder.accept(token)
                        generation.completion_tokens = len(decoder.generated)
                        if generation.first_token_at is None:
                            generation.first_token_at = time.monotonic()
                        if delta:
                            generation.push(delta)
                        if reason is None and generation.cancelled:
                            reason = "cancelled"
                        elif reason is None and deadline is not None and time.monotonic() > deadline:
                            reason, rest = "timeout", decoder._rest()
                            if rest:
                                generation.push(rest)
                        if reason is not None:
                            generation.finish_reason = reason
                            break
                        logits = llm.step(token)
            except Exception as exc:  # noqa: BLE001 - handed to the reader
                generation.push_error(exc)
            generation.finished_at = time.monotonic()
            generation.end()

        threading.Thread(target=run, daemon=True).start()
        return generation


def create_engine(kind: str, base_model: str, **options):
    """The engine `serve.engine` names."""
    if kind == "vllm":
        return VllmEngine(base_model, **options)
    if kind == "llama_cpp":
        return LlamaCppEngine(base_model, **options)
    from tailor.serve.engine import Engine

    return Engine(base_model, **options)
