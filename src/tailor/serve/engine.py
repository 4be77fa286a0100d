"""The serving engine: one base model, many customizations of it, decoded together with continuous batching.

The engine knows nothing of HTTP. A caller asks `stream(model, messages, ...)` (chat) or `complete(model, prompt,
...)` (raw text) for a `Generation`, iterates it for text deltas, and reads `finish_reason`, the token counts and
the timings off it once the iteration ends; `close()` cancels it.

One background thread decodes. Between two decoding steps it lets finished, cancelled and timed-out requests leave
the batch and prefills waiting ones, which then join it (continuous batching, as in Orca and vLLM). Customizations
mix in one batch without reloading or merging:
- LoRA adapters: per-row `adapter_names` in PEFT's forward, each row through its own low-rank update (or none);
- prompt-tuning / p-tuning adapters and prompt-table rows: their virtual-token embeddings are prepended to the row's
  prompt at prefill (`inputs_embeds`); afterwards they are ordinary cache entries;
- prefix-tuning adapters: their per-layer keys and values are the row's first cache entries;
- prompt profiles (methods/prompt.py): the base model given few-shot conversations;
- anything else (IA3, DoRA, a `full` run's model folder) is served by its own model copy with its own batch;
- any of them grounded (a folder with retrieval.json: `rag`, `raft`, retrieval.enabled): the request's question is
  searched in the index, the passages are quoted in the prompt, and the Generation carries them for citations; when
  retrieval finds nothing relevant the reply is the abstention, without decoding.

Requests wait in a bounded queue; a full queue raises `QueueFullError` with a retry hint rather than letting
latency grow without bound.
"""

from __future__ import annotations

import atexit
import itertools
import json
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tailor.errors import TailorError
from tailor.models.base import load_model, load_tokenizer, pick_dtype, resolve_base_model
from tailor.serve.batching import DecodeBatch, left_pad, positions_from_mask
from tailor.serve.sampling import Decoder, pick

if TYPE_CHECKING:
    from tailor.methods.prompt import PromptProfile

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
_END = object()


class UnknownModelError(TailorError):
    """The request named a model this engine does not serve."""


class PromptTooLongError(TailorError):
    """The conversation alone fills the model's context window."""


class UnsupportedRequestError(TailorError):
    """The model exists but cannot answer this kind of request (e.g. a prompt profile asked for raw completion);
    `param` names the request field at fault."""

    def __init__(self, message: str, param: str = "model"):
        super().__init__(message)
        self.param = param


class RetrievalUnavailableError(TailorError):
    """A grounded model could not retrieve (its index server is unreachable): the server, not the request, failed."""


class QueueFullError(TailorError):
    """Every decoding slot is busy and the waiting queue is full; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


def end_of_turn_ids(tokenizer, configured: int | list[int] | None = None) -> set[int]:
    """Token ids that end a reply: the tokenizer's eos, the model's configured eos ids, and the chat template's
    end-of-turn marker, which is not always the tokenizer's eos."""
    ids = {tokenizer.eos_token_id}
    ids.update(configured if isinstance(configured, list) else [configured])
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        token = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token, int) and token != tokenizer.unk_token_id:
            ids.add(token)
    return {i for i in ids if i is not None}


class Generation(Iterator[str]):
    """One reply being generated. Iterating yields text deltas; when it ends, `finish_reason` is "stop" (end of
    turn or a stop string), "length" (max_tokens or the context window), "timeout" (the request's time ran out;
    the text so far was delivered) or "cancelled" (closed), and `completion_tokens` is final.

    Timings (time.monotonic seconds): `created_at`, `first_token_at`, `finished_at`, and `token_times`, one per
    generated token, for time-to-first-token and inter-token latency metrics."""

    def __init__(self, model: str, prompt_tokens: int, engine: Engine | None = None):
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.created_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.token_times: list[float] = []
        self._engine = engine
        self._deltas: queue.SimpleQueue = queue.SimpleQueue()
        self._done = False
        self.cancelled = False
        self.retrieval = None  # retrieval.Retrieval of a grounded model: the passages its prompt quoted
        self.grounding = None  # retrieval.Grounding that cites the finished text
        # with logprobs asked for: per reply token (id, logprob, [(id, logprob) of the top alternatives]), and with
        # prompt logprobs the prompt's ids and the same per prompt token (None for the first: nothing predicts it)
        self.logprobs: list[TokenLogprobs] | None = None
        self.prompt_ids: list[int] | None = None
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None

    @classmethod
    def finished_with(cls, model: str, text: str, completion_tokens: int) -> Generation:
        """A reply decided without decoding (a grounded model abstaining): iterating yields `text` once."""
        generation = cls(model, 0)
        generation._deltas.put(text)
        generation._deltas.put(_END)
        generation.finish_reason, generation.completion_tokens = "stop", completion_tokens
        generation.first_token_at = generation.finished_at = time.monotonic()
        return generation

    def quoted_text(self) -> str:
        """The passages a grounded model was given (what its answer may quote as it is); "" for other models."""
        return "\n".join(p.text for p in self.retrieval.passages) if self.retrieval is not None else ""

    def citations(self, text: str) -> list[dict] | None:
        """The sources of the finished reply `text` (None for a model without retrieval)."""
        return None if self.grounding is None else self.grounding.cite(text, self.retrieval)

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        item = self._deltas.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def text(self) -> str:
        """Run to the end and return the whole reply."""
        return "".join(self)

    def close(self) -> None:
        """Stop generating now (e.g. the client went away); the row leaves the batch before the next step."""
        if self.finish_reason is None:
            self.cancelled = True
            if self._engine is not None:
                self._engine._wake()
        self._done = True

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.created_at


TokenLogprobs = tuple[int, float, list[tuple[int, float]]]


def outside_vocabulary(ids: list[int], vocabulary: int) -> tuple[int, int] | None:
    """(position, id) of the first token id a tokenizer of `vocabulary` ids does not have; None when all are in."""
    return next(((position, token) for position, token in enumerate(ids) if not 0 <= token < vocabulary), None)


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprobs]:
    """Each position's log-probability of its token and its `top` most likely tokens, from the raw logits
    [positions, vocab] (before temperature and top_p, as vLLM reports them)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [positions, vocab]
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    best_values, best_ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], logprobs[:, :0].long())
    return [(token, value, list(zip(ids, values, strict=True)))
            for token, value, ids, values in zip(tokens, chosen, best_ids.tolist(), best_values.tolist(),
                                                 strict=True)]


@dataclass(eq=False)
class _Customization:
    """What a served model name means to the decoder."""

    kind: str  # "base", "lora", "soft_prompt", "profile" or "model" (its own weights)
    backbone: str = "base"  # which loaded model decodes it
    adapter_key: str = BASE_ADAPTER  # the PEFT adapter of a LoRA row
    soft_prompt: torch.Tensor | None = None  # [virtual tokens, hidden], prepended at prefill
    prefix: list | None = None  # prefix tuning: per layer (keys, values), each [kv_heads, virtual tokens, head_dim]
    profile: Any = None  # PromptProfile
    grounding: Any = None  # retrieval.Grounding: retrieve per request, quote the passages, cite the answer
    folder: str | None = None
    requests: int = 0  # requests holding it; a replaced one is unloaded when this reaches 0
    retired: bool = False


@dataclass(eq=False)
class _Request:
    generation: Generation
    custom: _Customization
    prompt_ids: list[int]
    decoder: Decoder
    temperature: float
    top_p: float
    generator: torch.Generator | None
    deadline: float | None
    next_token: int = -1
    finished: bool = False
    logprobs: int | None = None  # alternatives recorded per reply token (0: the chosen one only); None: none
    prompt_logprobs: bool = False


_ENGINES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_engines() -> None:
    """Stop decode threads before the interpreter tears down: a thread still holding its OpenMP pool when the C++
    runtime exits aborts the process ("terminate called without an active exception", exit 134)."""
    for engine in list(_ENGINES):
        engine.shutdown()


class Engine:
    def __init__(self, base_model: str, adapters: dict[str, str] | None = None, base_name: str = "base",
                 dtype: torch.dtype | str | None = None, max_new_tokens: int = 256, system_prompt: str = "",
                 profiles: dict[str, PromptProfile] | None = None, *, max_batch_size: int = 16,
                 max_queue: int = 64, request_timeout: float | None = None, speculative_tokens: int | None = None,
                 answer_sentences: int | None = None):
        """`adapters` maps served names to folders: PEFT adapters (LoRA, prompt tuning, p-tuning, IA3, …), prompt
        profile folders, or whole model folders (a `full` run); `profiles` maps names to loaded prompt profiles.
        `speculative_tokens`: draft tokens a lone greedy request may check per step (prompt lookup); 0: off; None:
        4, except for float32 weights on a CPU, where checking them costs more than they save."""
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
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self._backbones: dict[str, Any] = {}
        self._batches: dict[str, DecodeBatch] = {"base": DecodeBatch()}
        self._models: dict[str, _Customization] = {base_name: _Customization("base")}
        self._retired: list[_Customization] = []
        self._keys = (f"adapter{i}" for i in itertools.count())
        # _model_lock: held by the decode thread for a whole step and by add/remove_adapter while they change
        # weights, so an adapter is swapped between steps, never during one
        self._model_lock = threading.RLock()
        self._lora_route: str | None = None  # how the LoRA layers are set: an adapter key, BASE_ADAPTER, "mixed"
        # bumped whenever a served name changes what it answers with: cached answers of the old version go stale
        self.revision = 0
        self._cond = threading.Condition()  # guards _waiting and _calls, and wakes the decode thread
        self._waiting: deque[_Request] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._running = 0
        self._seconds_per_request = 1.0  # moving average, for the retry hint of a full queue
        self._stopping = False
        self.peak_batch_size = 0  # the most rows one decoding step has run, for tests and benchmarks
        if speculative_tokens is None:
            # a forward pass over 5 positions vs 1, default model, CPU: bf16 1.12x (it pays), float32 1.6-2x (the
            # one-position product has a faster kernel)
            speculative_tokens = 0 if dtype == torch.float32 and not torch.cuda.is_available() else 4
        self.speculative_tokens = speculative_tokens
        self.speculation = {"steps": 0, "drafted": 0, "accepted": 0}  # speculative steps and their draft tokens
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._loop, name="tailor-decode", daemon=True)
        self._thread.start()
        _ENGINES.add(self)
        try:
            base = self._on_decode_thread(lambda: load_model(self.model_ref, dtype=dtype).eval())
            self.device = next(base.parameters()).device
            self.context_length = getattr(base.config, "max_position_embeddings", None)
            self._backbones["base"] = base
            self.end_of_turn_ids = self._end_of_turn_ids(base)
            for name, folder in (adapters or {}).items():
                self.add_adapter(name, folder)
            for name, profile in (profiles or {}).items():
                if name in self._models:
                    raise TailorError(f"serve: the prompt profile name '{name}' is taken by "
                                      f"{'the base model' if name == base_name else 'an adapter'}; rename it")
                self._models[name] = _Customization("profile", profile=profile)
        except BaseException:
            self.shutdown()
            raise

    def _on_decode_thread(self, work: Callable[[], Any]) -> Any:
        """Run `work` (loading weights, embedding a question) on the decode thread, between two steps, and return
        its result. Every parallel torch operation of the engine happens on that one thread: each thread that runs
        one keeps its own OpenMP thread pool alive, and with a second pool in the process libgomp stops letting
        idle workers spin (more OpenMP threads than cores), which made every decoding step about 30 % slower on 2
        cores (measured: one row 20 -> 13 tokens/s, eight rows 110 -> 78, while another thread held a pool)."""
        if threading.current_thread() is self._thread:
            return work()
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise TailorError("serve: the engine has stopped")
            self._calls.append((work, future))
            self._cond.notify()
        return future.result()

    # ----- the served models -----

    def model_names(self) -> list[str]:
        return list(self._models)

    def passage(self, chunk_id: str) -> dict | None:
        """A corpus chunk that a served model's index holds (what a citation's id points to), or None."""
        for custom in list(self._models.values()):
            if custom.grounding is not None:
                index = custom.grounding.retriever.index
                if chunk_id in index.position:
                    return index.chunks[index.position[chunk_id]]
        return None

    def add_adapter(self, name: str, folder: str | Path) -> None:
        """Serve `folder` (a PEFT adapter, a prompt profile folder or a whole model folder) as `name`. An existing
        name is replaced between two decoding steps: requests already running finish on the old version, new ones
        get the new one, and the old one is unloaded once no request uses it."""
        self._check_name(name)
        folder = Path(folder)
        custom = self._on_decode_thread(lambda: self._load(name, folder))
        with self._model_lock:
            old = self._models.get(name)
            self._models[name] = custom
            self.revision += 1
            if old is not None:
                self._retire(old)

    def remove_adapter(self, name: str) -> None:
        """Stop serving `name`; requests already running finish first, then its weights are unloaded."""
        if name == self.base_name:
            raise TailorError(f"serve: the base model '{name}' cannot be removed")
        with self._model_lock:
            if name not in self._models:
                raise UnknownModelError(f"model '{name}' does not exist; this server has "
                                        f"{', '.join(self.model_names())}")
            self._retire(self._models.pop(name))
            self.revision += 1

    def _check_name(self, name: str) -> None:
        if not name or not isinstance(name, str):
            raise TailorError("serve: a model name must be a non-empty string")
        if name == self.base_name:
            raise TailorError(f"serve: the adapter name '{name}' is taken by the base model; rename it")

    def _load(self, name: str, folder: Path) -> _Customization:
        """The customization in `folder`, with its retrieval when the folder holds retrieval.json."""
        from tailor.retrieval.grounding import RETRIEVAL_FILE, Grounding

        only_retrieval = (folder / RETRIEVAL_FILE).is_file() and not any(
            (folder / marker).is_file() for marker in ("profile.json", "adapter_config.json", "config.json"))
        custom = _Customization("base", folder=str(folder)) if only_retrieval else self._load_weights(name, folder)
        custom.grounding = Grounding.load(folder, self.count_tokens)
        return custom

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _load_weights(self, name: str, folder: Path) -> _Customization:
        from tailor.methods.prompt import PROFILE_FILE, load_profile

        if (folder / PROFILE_FILE).is_file():
            return _Customization("profile", profile=load_profile(folder), folder=str(folder))
        if (folder / "adapter_config.json").is_file():
            return self._load_peft(name, folder)
        if (folder / "config.json").is_file():
            model = load_model(str(folder), dtype=self.dtype).eval()
            if model.config.vocab_size != self._backbones["base"].config.vocab_size:
                raise TailorError(f"serve: model '{name}': {folder} has another vocabulary than the base model; "
                                  f"serve it with its own `tailor serve`")
            return self._own_backbone(model, folder)
        raise TailorError(f"serve: adapter '{name}': {folder} is not a PEFT adapter folder (no adapter_config.json), "
                          f"a prompt profile ({PROFILE_FILE}), a rag folder (retrieval.json) or a model folder "
                          f"(config.json)")

    def _load_peft(self, name: str, folder: Path) -> _Customization:
        import peft

        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        kind = config.get("peft_type")
        if kind in ("PROMPT_TUNING", "P_TUNING"):
            return _Customization("soft_prompt", soft_prompt=self._virtual_tokens(name, folder), folder=str(folder))
        if kind == "PREFIX_TUNING":
            return _Customization("prefix", prefix=self._prefix(name, folder, config), folder=str(folder))
        if kind == "LORA" and not config.get("use_dora"):
            with self._model_lock:
                key = next(self._keys)
                try:
                    base = self._backbones["base"]
                    self._lora_route = None  # loading changes the active adapter
                    if isinstance(base, peft.PeftModel):
                        base.load_adapter(str(folder), adapter_name=key, is_trainable=False)
                        # rows pick adapters with adapter_names, but PEFT's forward looks up the active one
                        base.set_adapter(key)
                    else:
                        self._backbones["base"] = peft.PeftModel.from_pretrained(base, str(folder), adapter_name=key,
                                                                                 is_trainable=False).eval()
                except (ValueError, KeyError, RuntimeError, OSError) as exc:
                    raise TailorError(f"serve: adapter '{name}': {folder} does not fit the base model "
                                      f"({str(exc).splitlines()[0]})") from None
            return _Customization("lora", adapter_key=key, folder=str(folder))
        # IA3, DoRA and other adapters PEFT cannot mix per row: folded into their own copy of the base
        base = load_model(self.model_ref, dtype=self.dtype)
        try:
            merged = peft.PeftModel.from_pretrained(base, str(folder)).merge_and_unload().eval()
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise TailorError(f"serve: adapter '{name}': {folder} does not fit the base model "
                              f"({str(exc).splitlines()[0]})") from None
        return self._own_backbone(merged, folder)

    def _own_backbone(self, model, folder: Path) -> _Customization:
        key = next(self._keys)
        with self._model_lock:
            self._backbones[key] = model
            self._batches[key] = DecodeBatch()
        return _Customization("model", backbone=key, folder=str(folder))

    def _virtual_tokens(self, name: str, folder: Path) -> torch.Tensor:
        from safetensors.torch import load_file

        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise TailorError(f"serve: adapter '{name}': {weights} is missing")
        tensors = load_file(str(weights))
        embeddings = tensors.get("prompt_embeddings")
        hidden = self._backbones["base"].get_input_embeddings().weight.shape[1]
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
        model_config = self._backbones["base"].config
        if (prefix is None or layers != model_config.num_hidden_layers or config.get("num_transformer_submodules", 1)
                != 1 or prefix.shape[-1] != layers * 2 * config.get("token_dim", 0)):
            raise TailorError(f"serve: adapter '{name}': {folder} is not a prefix-tuning adapter of this base model")
        virtual = prefix.shape[0]
        # [virtual, layers * 2 * token_dim] -> [layers * 2, heads, virtual, head_dim]; even rows keys, odd values
        kv = prefix.view(virtual, layers * 2, heads, -1).permute(1, 2, 0, 3).to(self.device, self.dtype)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]

    def add_prompt_table(self, table: str | Path, tasks: list[str] | None = None) -> list[str]:
        """Serve rows of a run's prompt table (`prompt_table.safetensors`, see methods/p_tuning.py), each under its
        task name; returns the names added."""
        from safetensors.torch import load_file

        rows = self._on_decode_thread(lambda: {task: row.to(self.device, self.dtype)
                                               for task, row in load_file(str(table)).items()})
        hidden = self._backbones["base"].get_input_embeddings().weight.shape[1]
        names = tasks if tasks is not None else sorted(rows)
        for task in names:
            if task not in rows:
                raise TailorError(f"serve: {table} has no task '{task}' (it has {', '.join(sorted(rows))})")
            if rows[task].dim() != 2 or rows[task].shape[1] != hidden:
                raise TailorError(f"serve: {table}: task '{task}' has width {rows[task].shape[-1]}, the base model "
                                  f"{hidden}; the table belongs to another base model")
        for task in names:
            self._check_name(task)
            with self._model_lock:
                old = self._models.get(task)
                self._models[task] = _Customization("soft_prompt", soft_prompt=rows[task], folder=str(table))
                if old is not None:
                    self._retire(old)
        return names

    def _retire(self, custom: _Customization) -> None:
        custom.retired = True
        self._retired.append(custom)
        self._unload_retired()

    def _unload_retired(self) -> None:
        """Free the weights of replaced or removed customizations that no request uses any more."""
        with self._model_lock:
            for custom in [c for c in self._retired if c.requests == 0]:
                self._retired.remove(custom)
                if custom.kind == "lora":
                    base = self._backbones["base"]
                    self._lora_route = None
                    base.delete_adapter(custom.adapter_key)
                    if not base.peft_config:  # PEFT cannot run with no adapter at all: back to the plain model
                        self._backbones["base"] = base.unload()
                    elif base.active_adapter not in base.peft_config:
                        base.set_adapter(next(iter(base.peft_config)))
                elif custom.kind == "model":
                    del self._backbones[custom.backbone], self._batches[custom.backbone]

    # ----- requests -----

    def stream(self, model: str, messages: list[dict], *, max_tokens: int | None = None, temperature: float = 1.0,
               top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
               timeout: float | None = None, logprobs: int | None = None) -> Generation:
        """Start a chat reply. Unknown models, over-long prompts and a full queue raise here, before any token."""
        custom = self._lookup(model)
        if self.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        if custom.kind == "profile":
            from tailor.methods.prompt import apply_profile

            # retrieving the examples embeds the question: a torch forward, so on the decode thread (between steps)
            messages = self._on_decode_thread(lambda: apply_profile(custom.profile, messages))
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
            return self._on_decode_thread(lambda: grounding.retrieve(messages))
        except TailorError as exc:
            raise RetrievalUnavailableError(str(exc)) from None

    def complete(self, model: str, prompt: str | list[int], *, max_tokens: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
                 timeout: float | None = None, logprobs: int | None = None, echo: bool = False) -> Generation:
        """Continue raw text or token ids (no chat template, no system prompt), for /v1/completions. With `echo`
        and `logprobs`, the prompt's tokens are scored too (what lm-evaluation-harness's loglikelihood reads)."""
        custom = self._lookup(model)
        if custom.kind == "profile" or custom.grounding is not None:
            what = "a prompt profile" if custom.kind == "profile" else "grounded in retrieved passages"
            raise UnsupportedRequestError(f"model '{model}' is {what}: it builds chat conversations, so it "
                                          f"answers chat completions only")
        prompt_ids = list(prompt) if isinstance(prompt, list) else self.tokenizer(prompt)["input_ids"]
        if not prompt_ids:
            raise UnsupportedRequestError("prompt: must not be empty", param="prompt")
        outside = outside_vocabulary(prompt_ids, len(self.tokenizer))
        if outside is not None:
            raise UnsupportedRequestError(f"prompt: token id {outside[1]} is not in the vocabulary (0 to "
                                          f"{len(self.tokenizer) - 1})", param="prompt")
        return self._submit(model, custom, prompt_ids, max_tokens, temperature, top_p, stop, seed, timeout, "prompt",
                            sentences=None, logprobs=logprobs, prompt_logprobs=echo and logprobs is not None)

    def _lookup(self, model: str) -> _Customization:
        custom = self._models.get(model)
        if custom is None:
            raise UnknownModelError(f"model '{model}' does not exist; this server has {', '.join(self.model_names())}")
        return custom

    def _submit(self, model: str, custom: _Customization, prompt_ids: list[int], max_tokens: int | None,
                temperature: float, top_p: float, stop: list[str] | None, seed: int | None,
                timeout: float | None, field_name: str, sentences: int | None = None, logprobs: int | None = None,
                prompt_logprobs: bool = False) -> Generation:
        budget = max_tokens or self.max_new_tokens
        virtual = (custom.soft_prompt.shape[0] if custom.soft_prompt is not None
                   else custom.prefix[0][0].shape[1] if custom.prefix is not None else 0)
        if self.context_length is not None:
            room = self.context_length - virtual - len(prompt_ids)
            if room < 1:
                raise PromptTooLongError(f"{field_name}: the {'conversation' if field_name == 'messages' else 'prompt'}"
                                         f" is {len(prompt_ids) + virtual} tokens; the model's context window is "
                                         f"{self.context_length}")
            budget = min(budget, room)
        generation = Generation(model, len(prompt_ids), self)
        timeout = timeout if timeout is not None else self.request_timeout
        request = _Request(
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
        with self._cond:
            free_slots = self.max_batch_size - self._running
            if len(self._waiting) >= self.max_queue + max(free_slots, 0):
                retry_after = round(max(0.5, (len(self._waiting) + 1) * self._seconds_per_request
                                        / self.max_batch_size), 1)
                raise QueueFullError(f"the server is busy ({self._running} requests decoding, {len(self._waiting)} "
                                     f"waiting); retry in {retry_after} s", retry_after)
            custom.requests += 1
            self._waiting.append(request)
            self._cond.notify()
        return generation

    def stats(self) -> dict:
        """Load figures for metrics and health checks."""
        with self._cond:
            return {"running": self._running, "waiting": len(self._waiting), "max_batch_size": self.max_batch_size,
                    "max_queue": self.max_queue, "peak_batch_size": self.peak_batch_size,
                    "speculation": dict(self.speculation)}

    def shutdown(self) -> None:
        """Stop the decode thread; unfinished requests end with finish_reason "cancelled"."""
        with self._cond:
            self._stopping = True
            calls, self._calls = list(self._calls), deque()
            self._cond.notify()
        for _, future in calls:
            future.set_exception(TailorError("serve: the engine has stopped"))
        self._thread.join(timeout=30)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ----- the decode thread -----

    def _loop(self) -> None:
        # OpenMP keeps the thread count per thread: the caller's torch.set_num_threads would not reach this one
        torch.set_num_threads(self._threads)
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and self._running == 0 and not self._calls:
                    self._cond.wait()
                if self._stopping:
                    break
                calls, self._calls = list(self._calls), deque()
            for work, future in calls:  # outside inference mode: loaded weights must stay ordinary tensors
                try:
                    future.set_result(work())
                except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                    future.set_exception(exc)
            with self._cond:
                self._expire_waiting()
                admitted = []
                while self._waiting and self._running + len(admitted) < self.max_batch_size:
                    admitted.append(self._waiting.popleft())
                self._running += len(admitted)
            # inference_mode here, in the thread that runs the model: grad mode is per thread
            with self._model_lock, torch.inference_mode():
                try:
                    self._drop_finished()
                    admitted = [r for r in admitted if not self._ended(r)]
                    if admitted:
                        self._prefill(admitted)
                    self._step()
                except Exception as exc:  # noqa: BLE001 - reported to every request it touched, the thread lives
                    self._fail_all(exc, admitted)
                self._unload_retired()
        self._fail_all(None, [])

    def _expire_waiting(self) -> None:
        """Requests cancelled or out of time while waiting leave the queue without a slot."""
        for request in [r for r in self._waiting if r.generation.cancelled
                        or (r.deadline is not None and time.monotonic() > r.deadline)]:
            self._waiting.remove(request)
            self._running += 1  # _finish counts it out of the running ones
            self._ended(request)

    def _ended(self, request: _Request) -> bool:
        """Finish a request that was cancelled or ran out of time; True when it did."""
        if request.generation.cancelled:
            self._finish(request, "cancelled")
        elif request.deadline is not None and time.monotonic() > request.deadline:
            self._finish(request, "timeout")
        else:
            return False
        return True

    def _drop_finished(self) -> None:
        for batch in self._batches.values():
            keep = [i for i, request in enumerate(batch.rows) if not self._ended(request)]
            batch.keep(keep)

    def _prefill(self, requests: list[_Request]) -> None:
        """Run the prompts of newly admitted requests (grouped by model and by kind: ids, soft prompt or prefix),
        pick each one's first token, and add them to their model's running batch."""
        groups: dict[tuple[str, str], list[_Request]] = {}
        for request in requests:
            groups.setdefault((request.custom.backbone, request.custom.kind), []).append(request)
        for (backbone, kind), group in groups.items():
            model = self._backbones[backbone]
            embedded = kind == "soft_prompt"
            if embedded:
                embed = model.get_input_embeddings()
                rows = [torch.cat([r.custom.soft_prompt,
                                   embed(torch.tensor(r.prompt_ids, device=self.device))]) for r in group]
                inputs_embeds, mask = left_pad(rows)  # [rows, width, hidden]
                inputs = {"inputs_embeds": inputs_embeds}
            else:
                ids, mask = left_pad([torch.tensor(r.prompt_ids, device=self.device) for r in group],
                                     self.tokenizer.pad_token_id)
                inputs = {"input_ids": ids}  # [rows, width]
            from transformers import DynamicCache

            cache, new_columns = DynamicCache(), mask.shape[1]
            if kind == "prefix":
                # each row's prefix is its first cache entries, right-aligned; the gap to its padded prompt is masked
                def stacked(layer: int, kv: int) -> tuple[torch.Tensor, torch.Tensor]:
                    padded, prefix_mask = left_pad([r.custom.prefix[layer][kv].transpose(0, 1) for r in group])
                    return padded.transpose(1, 2), prefix_mask  # [rows, heads, virtual, head_dim], [rows, virtual]

                cache = DynamicCache(ddp_cache_data=[(stacked(i, 0)[0], stacked(i, 1)[0])
                                                     for i in range(len(group[0].custom.prefix))])
                mask = torch.cat([stacked(0, 0)[1], mask], dim=1)
            scoring = any(r.prompt_logprobs for r in group)
            out = model(**inputs, attention_mask=mask, position_ids=positions_from_mask(mask)[:, -new_columns:],
                        past_key_values=cache, use_cache=True, logits_to_keep=0 if scoring else 1,
                        **self._adapter_args(model, group))
            for row, request in enumerate(group):
                if request.prompt_logprobs:  # the prompt fills the row's last columns; column j predicts j + 1
                    ids = request.prompt_ids
                    scored = out.logits[row, -len(ids):-1]  # [prompt - 1, vocab]
                    request.generation.prompt_logprobs = [None, *token_logprobs(scored, ids[1:], request.logprobs)]
            kept = self._accept(group, out.logits[:, -1])
            batch = self._batches[backbone]
            if kept:
                index = torch.tensor(kept, device=self.device)
                cache = out.past_key_values
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
                batch.join([group[i] for i in kept], cache, mask.index_select(0, index))

    def _step(self) -> None:
        """One token for every running row of every model (a lone greedy row: one or more, see `_draft`)."""
        for backbone, batch in self._batches.items():
            if not batch.rows:
                continue
            model = self._backbones[backbone]
            draft = self._draft(batch)
            ids = torch.tensor([[r.next_token, *draft] for r in batch.rows], device=self.device)  # [rows, 1 + draft]
            mask, positions = batch.step_inputs(ids.shape[1])
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=batch.cache,
                        use_cache=True, **self._adapter_args(model, batch.rows))
            batch.cache = out.past_key_values
            self.peak_batch_size = max(self.peak_batch_size, len(batch.rows))
            if draft:
                goes_on, used = self._verify(batch.rows[0], out.logits[0], draft)
                batch.rewind(len(draft) - used)  # the cache keeps the next token and the draft tokens that held
                batch.keep([0] if goes_on else [])
            else:
                batch.keep(self._accept(batch.rows, out.logits[:, -1]))

    def _draft(self, batch: DecodeBatch) -> list[int]:
        """Speculative decoding by prompt lookup (transformers' PromptLookupCandidateGenerator: the tokens that
        followed the first earlier occurrence of the last 3, 2 or 1 tokens, in the prompt or the reply). Only a batch
        of one greedy row: one row's step is bound by reading the weights, so checking more positions in the same
        forward pass costs little (default model, bf16: 4 positions 42.6 ms vs 1 position 40.3 ms with 2 threads;
        5 positions 1.12x one with 1 thread), and the draft tokens that match
        the model's own greedy choices are several tokens for one step. With more rows the step is compute-bound,
        and a sampled row's tokens would depend on whether it ran alone."""
        if (not self.speculative_tokens or len(batch.rows) != 1 or batch.rows[0].temperature != 0
                or batch.rows[0].logprobs is not None):  # a logprobs row records every position's distribution
            return []
        request = batch.rows[0]
        decoder = request.decoder
        room = min(self.speculative_tokens, decoder.max_tokens - len(decoder.generated) - 1)
        if room < 1:
            return []
        from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

        context = torch.tensor([request.prompt_ids + decoder.generated])
        lookup = PromptLookupCandidateGenerator(eos_token_id=torch.tensor(sorted(self.end_of_turn_ids)),
                                                num_output_tokens=room, max_matching_ngram_size=3,
                                                max_length=context.shape[1] + room + 1)
        candidates, _ = lookup.get_candidates(context)
        return candidates[0, context.shape[1]:].tolist()

    def _verify(self, request: _Request, logits: torch.Tensor, draft: list[int]) -> tuple[bool, int]:
        """Take the greedy tokens of a speculative step (`logits` [1 + draft, vocab]): each one that equals the draft
        token fed after it lets the next position count too. Returns (the row goes on, draft tokens kept)."""
        greedy = logits.float().argmax(-1).tolist()
        self.speculation["steps"] += 1
        self.speculation["drafted"] += len(draft)
        for used, token in enumerate(greedy):
            goes_on = self._take(request, token)
            if not goes_on or used == len(draft) or token != draft[used]:
                self.speculation["accepted"] += used
                return goes_on, used
        raise AssertionError("unreachable: the last position always ends the loop")

    def _adapter_args(self, model, requests: list[_Request]) -> dict:
        """Route a batch through its LoRA adapters. PEFT's per-row path (`adapter_names`) splits every projection
        by adapter, which made a decoding step 1.2-1.8x slower than the plain forward even when all rows agree
        (default model, 4 adapters loaded, 1 and 8 rows); so a batch whose rows all use one adapter, or none, runs
        the plain forward with that adapter active, or with the adapter layers off."""
        import peft

        if not isinstance(model, peft.PeftModel):
            return {}
        keys = [r.custom.adapter_key for r in requests]
        route = keys[0] if len(set(keys)) == 1 else "mixed"
        if route != self._lora_route:  # switching walks every module: only when the batch's route changes
            if route == BASE_ADAPTER:
                model.base_model.disable_adapter_layers()
            else:
                model.base_model.enable_adapter_layers()
                if route != "mixed":
                    model.set_adapter(route, inference_mode=True)
            self._lora_route = route
        return {"adapter_names": keys} if route == "mixed" else {}

    def _accept(self, requests: list[_Request], logits: torch.Tensor) -> list[int]:
        """Pick each row's next token from its logits [rows, vocab] and pass it on; returns the rows that go on."""
        logits = logits.float()
        greedy = logits.argmax(-1).tolist()
        going_on = []
        for i, request in enumerate(requests):
            token = greedy[i] if request.temperature == 0 else pick(logits[i], request.temperature, request.top_p,
                                                                    request.generator)
            if request.logprobs is not None and token not in self.end_of_turn_ids:  # as the reply's tokens
                request.generation.logprobs += token_logprobs(logits[i:i + 1], [token], request.logprobs)
            if self._take(request, token):
                going_on.append(i)
        return going_on

    def _take(self, request: _Request, token: int) -> bool:
        """Pass one chosen token to its request; True when the row goes on with it as its next input."""
        generation = request.generation
        delta, finish = request.decoder.accept(token)
        generation.completion_tokens = len(request.decoder.generated)
        if generation.first_token_at is None:
            generation.first_token_at = time.monotonic()
        if delta:
            generation._deltas.put(delta)
        if finish is not None:
            self._finish(request, finish)
            return False
        if self._ended(request):
            return False
        request.next_token = token
        return True

    def _finish(self, request: _Request, reason: str) -> None:
        if request.finished:
            return
        request.finished = True
        generation = request.generation
        if reason in ("timeout",):
            rest = request.decoder._rest()
            if rest:
                generation._deltas.put(rest)
        generation.finish_reason = reason
        generation.finished_at = time.monotonic()
        generation._deltas.put(_END)
        with self._cond:
            self._running -= 1
            request.custom.requests -= 1
            seconds = generation.finished_at - generation.created_at
            self._seconds_per_request = 0.9 * self._seconds_per_request + 0.1 * seconds

    def _fail_all(self, exc: BaseException | None, admitted: list[_Request]) -> None:
        """A forward pass failed (or the engine stops): end every running request, with the error if any."""
        for request in [*admitted, *(r for batch in self._batches.values() for r in batch.rows)]:
            if request.finished:
                continue
            if exc is not None:
                request.generation._deltas.put(exc)
            self._finish(request, "error" if exc is not None else "cancelled")
        for batch in self._batches.values():
            batch.keep([])
        if exc is None:
            with self._cond:
                waiting, self._waiting = list(self._waiting), deque()
                self._running += len(waiting)
            for request in waiting:
                self._finish(request, "cancelled")

    def _end_of_turn_ids(self, model) -> set[int]:
        return end_of_turn_ids(self.tokenizer, getattr(model.generation_config, "eos_token_id", None))
