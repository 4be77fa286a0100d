"""Continuous batching: the one decode thread, the bounded waiting queue, and each request's way through them.

Between two decoding steps the thread lets finished, cancelled and timed-out requests leave their batch and prefills
waiting ones, which then join it (as in Orca and vLLM); every loaded model decodes its own batch (`batching.py` keeps
a batch's rows, cache and mask). The forward passes themselves are `decoding.Decoding`'s.

Requests wait in a bounded queue; a full queue raises `QueueFullError` with a retry hint rather than letting
latency grow without bound.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from tailor.errors import TailorError
from tailor.serve.batching import DecodeBatch, select_rows
from tailor.serve.customizations import Customization, Customizations
from tailor.serve.decoding import Decoding
from tailor.serve.protocol import Generation, QueueFullError
from tailor.serve.sampling import Decoder


@dataclass(eq=False)
class Request:
    """One reply on the decode thread: its prompt, its sampling, and where it stands."""

    generation: Generation
    custom: Customization
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


class Scheduler:
    """Owns the decode thread. `condition` guards the queue and the running count, and wakes the thread; holding it
    keeps the thread from admitting anything (tests queue several requests to form one batch)."""

    def __init__(self, max_batch_size: int, max_queue: int):
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.condition = threading.Condition()
        self.batches: dict[str, DecodeBatch] = {}  # per loaded model (customizations.backbones key)
        self._waiting: deque[Request] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._running = 0
        self._seconds_per_request = 1.0  # moving average, for the retry hint of a full queue
        self._stopping = False
        self._customizations: Customizations | None = None
        self._decoding: Decoding | None = None
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._loop, name="tailor-decode", daemon=True)
        self._thread.start()

    def attach(self, customizations: Customizations, decoding: Decoding) -> None:
        """What to decode with; set once the base model is loaded (loading itself runs on this thread)."""
        self._customizations, self._decoding = customizations, decoding

    def on_decode_thread(self, work: Callable[[], Any]) -> Any:
        """Run `work` (loading weights, embedding a question) on the decode thread, between two steps, and return
        its result. Every parallel torch operation of the engine happens on that one thread: each thread that runs
        one keeps its own OpenMP thread pool alive, and with a second pool in the process libgomp stops letting
        idle workers spin (more OpenMP threads than cores), which made every decoding step about 30 % slower on 2
        cores (measured: one row 20 -> 13 tokens/s, eight rows 110 -> 78, while another thread held a pool)."""
        if threading.current_thread() is self._thread:
            return work()
        future: Future = Future()
        with self.condition:
            if self._stopping:
                raise TailorError("serve: the engine has stopped")
            self._calls.append((work, future))
            self.condition.notify()
        return future.result()

    def submit(self, request: Request) -> None:
        """Queue a request, or raise QueueFullError when every slot is busy and the queue is full."""
        with self.condition:
            free_slots = self.max_batch_size - self._running
            if len(self._waiting) >= self.max_queue + max(free_slots, 0):
                retry_after = round(max(0.5, (len(self._waiting) + 1) * self._seconds_per_request
                                        / self.max_batch_size), 1)
                raise QueueFullError(f"the server is busy ({self._running} requests decoding, {len(self._waiting)} "
                                     f"waiting); retry in {retry_after} s", retry_after)
            request.custom.requests += 1
            self._waiting.append(request)
            self.condition.notify()

    def stats(self) -> dict:
        with self.condition:
            return {"running": self._running, "waiting": len(self._waiting), "max_batch_size": self.max_batch_size,
                    "max_queue": self.max_queue}

    def shutdown(self) -> None:
        """Stop the decode thread; unfinished requests end with finish_reason "cancelled"."""
        with self.condition:
            self._stopping = True
            calls, self._calls = list(self._calls), deque()
            self.condition.notify()
        for _, future in calls:
            future.set_exception(TailorError("serve: the engine has stopped"))
        self._thread.join(timeout=30)

    def wake(self) -> None:
        with self.condition:
            self.condition.notify()

    # ----- the decode thread -----

    def _loop(self) -> None:
        # OpenMP keeps the thread count per thread: the caller's torch.set_num_threads would not reach this one
        torch.set_num_threads(self._threads)
        while True:
            with self.condition:
                while not self._stopping and not self._waiting and self._running == 0 and not self._calls:
                    self.condition.wait()
                if self._stopping:
                    break
                calls, self._calls = list(self._calls), deque()
            for work, future in calls:  # outside inference mode: loaded weights must stay ordinary tensors
                try:
                    future.set_result(work())
                except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                    future.set_exception(exc)
            with self.condition:
                self._expire_waiting()
                admitted: list[Request] = []
                while self._waiting and self._running + len(admitted) < self.max_batch_size:
                    admitted.append(self._waiting.popleft())
                self._running += len(admitted)
            if self._customizations is None or self._decoding is None:
                continue  # nothing is queued before attach(): only loading calls ran
            customizations, decoding = self._customizations, self._decoding
            # inference_mode here, in the thread that runs the model: grad mode is per thread
            with customizations.lock, torch.inference_mode():
                try:
                    self._drop_finished(customizations)
                    admitted = [r for r in admitted if not self._ended(r)]
                    if admitted:
                        self._prefill(decoding, admitted)
                    self._step(decoding)
                except Exception as exc:  # noqa: BLE001 - reported to every request it touched, the thread lives
                    self._fail_all(exc, admitted)
                customizations.unload_retired()
        self._fail_all(None, [])

    def _expire_waiting(self) -> None:
        """Requests cancelled or out of time while waiting leave the queue without a slot."""
        for request in [r for r in self._waiting if r.generation.cancelled
                        or (r.deadline is not None and time.monotonic() > r.deadline)]:
            self._waiting.remove(request)
            self._running += 1  # _finish counts it out of the running ones
            self._ended(request)

    def _ended(self, request: Request) -> bool:
        """Finish a request that was cancelled or ran out of time; True when it did."""
        if request.generation.cancelled:
            self._finish(request, "cancelled")
        elif request.deadline is not None and time.monotonic() > request.deadline:
            self._finish(request, "timeout")
        else:
            return False
        return True

    def _drop_finished(self, customizations: Customizations) -> None:
        for backbone, batch in list(self.batches.items()):
            keep = [i for i, request in enumerate(batch.rows) if not self._ended(request)]
            batch.keep(keep)
            if not batch.rows and backbone not in customizations.backbones:
                del self.batches[backbone]  # its model was unloaded

    def _prefill(self, decoding: Decoding, requests: list[Request]) -> None:
        """Prefill newly admitted requests, grouped by model and by kind (ids, soft prompt or prefix), hand on each
        one's first token, and add those that go on to their model's running batch."""
        groups: dict[tuple[str, str], list[Request]] = {}
        for request in requests:
            groups.setdefault((request.custom.backbone, request.custom.kind), []).append(request)
        for (backbone, kind), group in groups.items():
            tokens, cache, mask = decoding.prefill(backbone, kind, group)
            kept = [i for i, (request, token) in enumerate(zip(group, tokens, strict=True))
                    if self._take(request, token)]
            if kept:
                batch = self.batches.setdefault(backbone, DecodeBatch())
                batch.join([group[i] for i in kept], *select_rows(cache, mask, kept))

    def _step(self, decoding: Decoding) -> None:
        """One step for every running batch: one token per row (a lone greedy row: one or more, see
        `Decoding._draft`)."""
        for backbone, batch in self.batches.items():
            if not batch.rows:
                continue
            tokens, drafted = decoding.step(backbone, batch)
            going_on = []
            for i, (request, row_tokens) in enumerate(zip(batch.rows, tokens, strict=True)):
                for used, token in enumerate(row_tokens):  # noqa: B007 - `used` is read after the loop
                    goes_on = self._take(request, token)
                    if not goes_on:
                        break
                if goes_on:
                    going_on.append(i)
            if drafted:  # the cache keeps the next token and the draft tokens that held
                decoding.accepted(used)
                batch.rewind(drafted - used)
            batch.keep(going_on)

    def _take(self, request: Request, token: int) -> bool:
        """Pass one chosen token to its request; True when the row goes on with it as its next input."""
        generation = request.generation
        delta, finish = request.decoder.accept(token)
        generation.completion_tokens = len(request.decoder.generated)
        if generation.first_token_at is None:
            generation.first_token_at = time.monotonic()
        if delta:
            generation.push(delta)
        if finish is not None:
            self._finish(request, finish)
            return False
        if self._ended(request):
            return False
        request.next_token = token
        return True

    def _finish(self, request: Request, reason: str) -> None:
        if request.finished:
            return
        request.finished = True
        generation = request.generation
        if reason == "timeout":
            rest = request.decoder._rest()
            if rest:
                generation.push(rest)
        generation.finish_reason = reason
        generation.finished_at = time.monotonic()
        generation.end()
        with self.condition:
            self._running -= 1
            request.custom.requests -= 1
            seconds = generation.finished_at - generation.created_at
            self._seconds_per_request = 0.9 * self._seconds_per_request + 0.1 * seconds

    def _fail_all(self, exc: BaseException | None, admitted: list[Request]) -> None:
        """A forward pass failed (or the engine stops): end every running request, with the error if any."""
        for request in [*admitted, *(r for batch in self.batches.values() for r in batch.rows)]:
            if request.finished:
                continue
            if exc is not None:
                request.generation.push_error(exc)
            self._finish(request, "error" if exc is not None else "cancelled")
        for batch in self.batches.values():
            batch.keep([])
        if exc is None:
            with self.condition:
                waiting, self._waiting = list(self._waiting), deque()
                self._running += len(waiting)
            for request in waiting:
                self._finish(request, "cancelled")
