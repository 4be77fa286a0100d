"""One `tailor serve` with several customizations loaded, used by every client at once: the official openai client,
the admin API, the chat page in headless Chromium and a concurrent load, on the default model over loopback HTTP.

    python benchmarks/serve_session.py [--quick] [--max-tokens N]
        → benchmarks/results/serve_session.json, benchmarks/results/serve_session.png (the chat page)

The server is the real CLI (`tailor serve -w WORKSPACE --port P`, its own process, a free loopback port) on a
temporary copy of examples/city-services whose tailor.yaml declares `serve.adapters`:
- city0 … city3: four LoRA adapters with random updates (benchmarks/serve.py's `random_adapters`, not trained);
- soft: a prompt-tuning soft prompt, 8 virtual tokens (peft PromptTuningConfig, initialized from randomly sampled
  vocabulary embeddings, not trained);
- prompt and lora: the run's own customizations, the city example's prompt profile (`tailor train --method prompt`,
  seconds) and a LoRA adapter trained for LORA_STEPS steps on its Q/A (`tailor train --method lora`, a minute or two).
`serve.cache_size: 0`, so every request decodes. Then, against that one server, in order:
a. openai client: /v1/models lists every name; one non-streaming and one streaming greedy chat completion per model
   (answers, token counts, whether the customized answers differ from the base's); /v1/completions on the base;
b. admin: a fifth LoRA adapter added with POST /v1/admin/adapters, answered, removed with DELETE, /v1/models
   before, between and after;
c. the chat page (Playwright, Debian's /usr/bin/chromium): pick the trained LoRA, ask, wait for the streamed answer,
   thumbs-down with a correction, screenshot; the feedback row read back from the server's SQLite file
   (serve.feedback_db in the run folder), and a /v1/feedback round trip through the API;
d. load (benchmarks/serve.py's `load`): 1, 4, 8 and 16 concurrent streaming clients on the base model, 8 clients
   mixed over the four LoRA adapters; aggregate output tokens/s and time to first token p50/p99 per level, then the
   server's /metrics (cache hits/misses, time-to-first-token histograms per model);
e. HTTP status codes over everything above, from the server's request log: the goal is zero 5xx.
Every phase has a time limit; the server is always stopped. No baseline here: benchmarks/serve.py keeps the ratios
against a naive server; this script shows that everything works against one server with all customizations loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import yaml  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as serve_benchmark  # noqa: E402  (benchmarks/serve.py: random adapters and the load generator)

from tailor.config import load_config  # noqa: E402
from tailor.workspace import atomic_path, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EXAMPLE = REPO / "examples" / "city-services"
TAILOR = [sys.executable, "-m", "tailor.cli.app"]
CHROMIUM = os.environ.get("TAILOR_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
LORAS = 4
LORA_STEPS = 16  # the trained adapter: enough to change the answers, a minute or two on this CPU
CONCURRENCY = (1, 4, 8, 16)
QUESTION = "When is the public library open?"
console = Console()


class PhaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(name: str, seconds: int):
    """Stop a phase that runs past `seconds` (SIGALRM interrupts blocking socket reads in the main thread too)."""
    def expired(signum, frame):
        raise PhaseTimeout(f"{name}: still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(*args: str, timeout: int) -> None:
    result = subprocess.run([*TAILOR, *args], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"tailor {' '.join(args)} failed:\n{result.stderr[-2000:]}")


def soft_prompt(model_ref: str, folder: Path) -> str:
    """A prompt-tuning adapter, 8 virtual tokens, initialized from randomly sampled vocabulary embeddings (untrained:
    the right shape and scale, so its answers differ from the base's without being noise)."""
    import peft
    import torch

    from tailor.models.base import load_model

    torch.manual_seed(0)
    model = peft.get_peft_model(load_model(model_ref, dtype=torch.float32), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=8, prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB))
    model.save_pretrained(folder)
    return str(folder)


def make_workspace(workspace: Path, model_ref: str, base_model: str) -> dict[str, str]:
    """The city example with four LoRA adapters and a soft prompt in `serve.adapters`, and a prompt profile as the
    run's own customization. Returns the runtime-only adapter (added in phase b) as {name: folder}."""
    shutil.copytree(EXAMPLE, workspace)
    loras = serve_benchmark.random_adapters(model_ref, workspace / "adapters", LORAS + 1)
    extra = {name: loras.pop(name) for name in list(loras)[LORAS:]}  # not declared: added at runtime
    soft_prompt(model_ref, workspace / "adapters" / "soft")
    config = yaml.safe_load((workspace / "tailor.yaml").read_text())
    config["base_model"] = base_model
    config["serve"] = {"adapters": {**{name: f"adapters/{name}" for name in loras}, "soft": "adapters/soft"},
                       "cache_size": 0,  # every request decodes: the load measures decoding, not the cache
                       # the chat page sends no max_tokens: room for a whole one-sentence answer there
                       "max_new_tokens": 64, "request_timeout": 300}
    (workspace / "tailor.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run_cli("data", "build", "-w", str(workspace), timeout=300)
    run_cli("train", "-w", str(workspace), "--method", "prompt", timeout=600)
    # a trained customization too, beside the random ones: the run's LoRA adapter, a short run on the city Q/A
    run_cli("train", "-w", str(workspace), "--method", "lora", f"train.max_steps={LORA_STEPS}", timeout=900)
    return extra


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CliServer:
    """`tailor serve` in its own process, as a user starts it; stopped by `stop()` whatever happened."""

    def __init__(self, workspace: Path, log: Path, startup_timeout: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = log.open("w")
        self.process = subprocess.Popen([*TAILOR, "serve", "-w", str(workspace), "--port", str(self.port)],
                                        stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"tailor serve exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tailor serve did not answer /health in {startup_timeout} s:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            time.sleep(0.5)

    def log_tail(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._log_file.close()


def openai_phase(url: str, statuses: collections.Counter, expected: list[str], max_tokens: int) -> dict:
    """Every model through the official client, non-streaming and streaming, greedy; a legacy completion."""
    from openai import OpenAI

    http = httpx.Client(timeout=300, event_hooks={"response": [lambda r: statuses.update([r.status_code])]})
    client = OpenAI(base_url=f"{url}/v1", api_key="none", http_client=http, max_retries=0)
    listed = [model.id for model in client.models.list()]
    messages = [{"role": "user", "content": QUESTION}]
    models = {}
    for name in listed:
        reply = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=max_tokens)
        pieces, usage = [], None
        for chunk in client.chat.completions.create(model=name, messages=messages, temperature=0,
                                                    max_tokens=max_tokens, stream=True,
                                                    stream_options={"include_usage": True}):
            pieces += [c.delta.content for c in chunk.choices if c.delta.content]
            usage = chunk.usage or usage
        streamed = "".join(pieces)
        models[name] = {"answer": reply.choices[0].message.content, "finish_reason": reply.choices[0].finish_reason,
                        "prompt_tokens": reply.usage.prompt_tokens, "completion_tokens": reply.usage.completion_tokens,
                        "response_id": reply.id, "streamed_answer": streamed, "stream_chunks": len(pieces),
                        "streamed_completion_tokens": usage.completion_tokens if usage else None,
                        "stream_equals_non_stream": streamed == reply.choices[0].message.content}
    base_answer = models["base"]["answer"]
    for name, row in models.items():
        row["differs_from_base"] = name != "base" and row["answer"] != base_answer
    completion = client.completions.create(model="base", prompt="The Maplewood public library opens at",
                                           temperature=0, max_tokens=max_tokens)
    http.close()
    return {"listed_models": listed, "all_listed": sorted(listed) == sorted(expected), "models": models,
            "completion": {"text": completion.choices[0].text, "completion_tokens": completion.usage.completion_tokens},
            "customized_differ_from_base": {n: r["differs_from_base"] for n, r in models.items() if n != "base"}}


def admin_phase(url: str, statuses: collections.Counter, name: str, folder: str, max_tokens: int) -> dict:
    """Add one adapter at runtime, answer with it, remove it; the model list before, between and after."""
    hooks = {"response": [lambda r: statuses.update([r.status_code])]}
    with httpx.Client(base_url=url, timeout=300, event_hooks=hooks) as http:
        def listed() -> list[str]:
            return [m["id"] for m in http.get("/v1/models").json()["data"]]

        before = listed()
        added = http.post("/v1/admin/adapters", json={"name": name, "path": folder})
        between = listed()
        answer = http.post("/v1/chat/completions", json={
            "model": name, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
            "max_tokens": max_tokens})
        removed = http.delete(f"/v1/admin/adapters/{name}")
        after = listed()
        gone = http.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "Hi"}]})
    return {"name": name, "add_status": added.status_code, "remove_status": removed.status_code,
            "answer": answer.json()["choices"][0]["message"]["content"] if answer.status_code == 200 else None,
            "answer_status": answer.status_code, "after_removal_status": gone.status_code,
            "listed_before": name in before, "listed_after_add": name in between, "listed_after_remove": name in after,
            "ok": (added.status_code == 201 and name not in before and name in between and answer.status_code == 200
                   and removed.status_code == 204 and name not in after and gone.status_code == 404)}


def page_phase(url: str, statuses: collections.Counter, model: str, feedback_db: Path, response_id: str,
               screenshot: Path) -> dict:
    """The chat page in headless Chromium: pick `model`, ask, thumbs-down with a correction, screenshot; then the
    feedback row in the server's SQLite file, and one more piece of feedback through the API."""
    from playwright.sync_api import sync_playwright

    correction = "The library is open Monday to Saturday, 9 am to 8 pm."
    if not os.path.exists(CHROMIUM):
        raise RuntimeError(f"no Chromium at {CHROMIUM}: `make setup` installs it (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.set_default_timeout(240_000)
            page.on("response", lambda r: statuses.update([r.status]))
            page.goto(url)
            page.wait_for_function("() => document.querySelectorAll('#model option').length >= 2")
            picker = page.locator("#model option").all_inner_texts()
            page.select_option("#model", model)
            page.evaluate("""() => {
                window.updates = 0;
                new MutationObserver(() => window.updates++).observe(document.getElementById("log"),
                    {childList: true, subtree: true, characterData: true});
            }""")
            page.fill("#input", QUESTION)
            page.press("#input", "Enter")
            page.wait_for_function("() => document.querySelectorAll('.msg.assistant').length > 0 && "
                                   "document.querySelectorAll('.msg.assistant.pending').length === 0")
            answer = page.locator(".msg.assistant").last.inner_text()
            updates = page.evaluate("window.updates")
            turn = page.locator(".turn").last
            turn.get_by_role("button", name="thumbs down").click()
            turn.get_by_label("correction").fill(correction)
            turn.get_by_role("button", name="Send feedback").click()
            page.wait_for_function("() => document.querySelector('.turn:last-of-type .feedback span')"
                                   "?.textContent.startsWith('Thanks')")
            with atomic_path(screenshot) as tmp:
                page.screenshot(path=str(tmp), type="png", full_page=True)
        finally:
            browser.close()
    with sqlite3.connect(f"file:{feedback_db}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT model, rating, correction, answer FROM feedback ORDER BY id").fetchall()
    page_row = next((row for row in rows if row[2] == correction), None)
    with httpx.Client(base_url=url, timeout=60,
                      event_hooks={"response": [lambda r: statuses.update([r.status_code])]}) as http:
        receipt = http.post("/v1/feedback", json={"response_id": response_id, "rating": "up",
                                                  "comment": "serve_session: API round trip"})
    with sqlite3.connect(f"file:{feedback_db}?mode=ro", uri=True) as db:
        api_row = db.execute("SELECT model, rating, comment FROM feedback WHERE id = ?",
                             (receipt.json().get("id"),)).fetchone() if receipt.status_code == 200 else None
    return {"picker": picker, "model": model, "question": QUESTION, "answer": answer, "dom_updates": updates,
            "streamed": updates > 3, "feedback_row": list(page_row) if page_row else None,
            "feedback_row_ok": bool(page_row) and page_row[:2] == (model, "down")
            and page_row[3].strip() == answer.strip(),
            "api_feedback": {"status": receipt.status_code, "receipt": receipt.json(),
                             "row": list(api_row) if api_row else None},
            "api_feedback_ok": receipt.status_code == 200 and api_row is not None and api_row[1] == "up",
            "screenshot": str(screenshot.relative_to(REPO) if screenshot.is_relative_to(REPO) else screenshot)}


def metrics_summary(url: str, statuses: collections.Counter) -> dict:
    """Cache hits/misses, generated tokens and time-to-first-token histograms per model, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{url}/metrics", timeout=60)
    statuses.update([response.status_code])
    summary: dict = {"ttft": {}, "generated_tokens": {}, "requests": {}, "errors": {}}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            model = sample.labels.get("model")
            if sample.name in ("tailor_cache_hits_total", "tailor_cache_misses_total"):
                summary[sample.name.removeprefix("tailor_").removesuffix("_total")] = sample.value
            elif sample.name == "tailor_generated_tokens_total":
                summary["generated_tokens"][model] = sample.value
            elif sample.name == "tailor_requests_total":
                summary["requests"][f"{model} {sample.labels['endpoint']}"] = sample.value
            elif sample.name == "tailor_errors_total":
                summary["errors"][f"{model} {sample.labels['status']}"] = sample.value
            elif sample.name.startswith("tailor_time_to_first_token_seconds"):
                row = summary["ttft"].setdefault(model, {"buckets": {}})
                if sample.name.endswith("_bucket"):
                    row["buckets"][sample.labels["le"]] = sample.value
                elif sample.name.endswith("_count"):
                    row["count"] = sample.value
                elif sample.name.endswith("_sum"):
                    row["sum_s"] = round(sample.value, 3)
    for row in summary["ttft"].values():
        row["mean_s"] = round(row["sum_s"] / row["count"], 3) if row.get("count") else None
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer requests and shorter answers (minutes).")
    parser.add_argument("--max-tokens", type=int, default=None, help="Answer cap (default 48, quick 24).")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_session.json")
    parser.add_argument("--screenshot", type=Path, default=RESULTS / "serve_session.png")
    parser.add_argument("--base-model", default="smollm2-135m-instruct", help=(
        "Base model (default: the bundled one); a small local model folder makes a quick rehearsal."))
    args = parser.parse_args()
    args.screenshot = args.screenshot.resolve()
    max_tokens = args.max_tokens or (24 if args.quick else 48)
    per_client = 1 if args.quick else 2
    from tailor.models.base import resolve_base_model

    model_ref = resolve_base_model(args.base_model)
    prompts = serve_benchmark.questions()
    report: dict = {"model": args.base_model, "quick": args.quick, "max_tokens": max_tokens,
                    "requests_per_client": per_client, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "note": "one `tailor serve` process, loopback HTTP, greedy decoding; city0-3 and the soft prompt "
                            "are random (untrained), lora is trained; timings on a CPU shared with other work vary"}
    statuses: collections.Counter = collections.Counter()  # client side, every response of every phase
    phases = ["workspace", "server start", "openai client", "admin adapters", "chat page", "load", "status codes"]
    server = None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tailor-session-") as tmp, Progress(console=console) as progress:
        steps = progress.add_task("serve session", total=len(phases))

        @contextlib.contextmanager
        def phase(name: str, seconds: int):
            progress.update(steps, description=name)
            begun = time.perf_counter()
            with time_limit(name, seconds):
                yield
            report.setdefault("phase_seconds", {})[name] = round(time.perf_counter() - begun, 1)

        try:
            workspace = Path(tmp) / "city"
            with phase("workspace", 900):
                extra = make_workspace(workspace, model_ref, args.base_model)
            progress.advance(steps)
            served = ["base", *[f"city{i}" for i in range(LORAS)], "soft", "prompt", "lora"]
            report["served_models"] = {"base": args.base_model,
                                       **{f"city{i}": "LoRA r=16, all projections, random" for i in range(LORAS)},
                                       "soft": "prompt tuning, 8 virtual tokens, random vocabulary init",
                                       "prompt": "prompt profile of examples/city-services (the run's own)",
                                       "lora": f"LoRA trained {LORA_STEPS} steps on the city Q/A (the run's own)"}
            with phase("server start", 600):
                t0 = time.perf_counter()
                server = CliServer(workspace, Path(tmp) / "server.log", startup_timeout=580)
                report["server_start_s"] = round(time.perf_counter() - t0, 1)
            progress.advance(steps)

            with phase("openai client", 900):
                report["openai"] = openai_phase(server.url, statuses, served, max_tokens)
            progress.advance(steps)
            listed = report["openai"]["listed_models"]
            console.print(f"openai client: {len(listed)} models listed ({', '.join(listed)}); customized answers "
                          f"differ from base: {report['openai']['customized_differ_from_base']}")

            with phase("admin adapters", 300):
                name, folder = next(iter(extra.items()))
                report["admin"] = admin_phase(server.url, statuses, name, folder, max_tokens)
            progress.advance(steps)
            console.print(f"admin: {name} added ({report['admin']['add_status']}), answered, removed "
                          f"({report['admin']['remove_status']}); ok={report['admin']['ok']}")

            with phase("chat page", 600):
                # the server keeps completions and feedback in serve.feedback_db, relative to the served run folder
                feedback_db = workspace / "run" / load_config(workspace)[0].serve.feedback_db
                report["chat_page"] = page_phase(server.url, statuses, "lora", feedback_db,
                                                 report["openai"]["models"]["base"]["response_id"], args.screenshot)
            progress.advance(steps)
            page = report["chat_page"]
            console.print(f"chat page: {page['dom_updates']} streamed updates, feedback row {page['feedback_row_ok']}, "
                          f"API feedback {page['api_feedback_ok']}")

            levels = {}
            loras = [f"city{i}" for i in range(LORAS)]
            with phase("load", 1200):
                asyncio.run(serve_benchmark.load(server.url, ["base"], prompts, 2, 1, 4, True))  # warm-up
                for clients in CONCURRENCY:
                    progress.update(steps, description=f"load: {clients} clients on base")
                    per = max(per_client, 4) if clients == 1 else per_client  # one client alone needs a few
                    levels[f"base x{clients}"] = asyncio.run(serve_benchmark.load(
                        server.url, ["base"], prompts, clients, per, max_tokens, True))
                progress.update(steps, description="load: 8 clients mixed over 4 LoRA adapters")
                levels["4 LoRA mixed x8"] = asyncio.run(serve_benchmark.load(server.url, loras, prompts, 8, per_client,
                                                                             max_tokens, True))
                report["load"] = levels
                report["metrics"] = metrics_summary(server.url, statuses)
            progress.advance(steps)
        except BaseException as exc:
            report["error"] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if server is not None:
                server.stop()
                if "error" in report:  # what the server said, for the failure
                    report["server_log_tail"] = server.log_tail()[-1500:]
            report["seconds"] = round(time.perf_counter() - started, 1)
            # the server's own request log counts every request, browser and load included
            server_statuses: collections.Counter = collections.Counter()
            if (workspace / "tailor.yaml").is_file() and server is not None:
                request_log = workspace / "run" / load_config(workspace)[0].serve.request_log
                records = [json.loads(line) for line in request_log.read_text().splitlines() if line.strip()]
                server_statuses.update(r["status"] for r in records if r.get("event") == "request")
                # which requests were refused, so an expected 404 (a removed adapter) is told from a real one
                report["refused_requests"] = [f"{r['status']} {r['method']} {r['path']}" for r in records
                                              if r.get("event") == "request" and r["status"] >= 400]
            report["status_codes"] = {"server_request_log": {str(k): v for k, v in sorted(server_statuses.items())},
                                      "client_side": {str(k): v for k, v in sorted(statuses.items())}}
            report["server_5xx"] = sum(v for k, v in server_statuses.items() if k >= 500)
            progress.advance(steps)
            write_json(args.out, report)

    table = Table(title="tailor serve: one server, 7 models")
    for column in ("check", "result"):
        table.add_column(column)
    openai_report = report["openai"]
    listed = openai_report["listed_models"]
    table.add_row("models listed", f"{len(listed)}: {', '.join(listed)}")
    for name, row in openai_report["models"].items():
        table.add_row(f"{name}: answer", f"{row['answer'][:70]!r} ({row['completion_tokens']} tokens, "
                                         f"{row['stream_chunks']} stream chunks"
                                         f"{', differs from base' if row['differs_from_base'] else ''})")
    table.add_row("admin add/answer/remove", str(report["admin"]["ok"]))
    page = report["chat_page"]
    table.add_row(f"chat page ({page['model']})", f"{page['answer'][:60]!r}, {page['dom_updates']} DOM updates; "
                                                  f"feedback row {page['feedback_row_ok']}, API feedback "
                                                  f"{page['api_feedback_ok']}")
    for level, row in report["load"].items():
        table.add_row(f"load {level}", f"{row['tokens_per_second']} tok/s, TTFT p50 {row['ttft_p50_s']} s, "
                                       f"p99 {row['ttft_p99_s']} s ({row['requests']} requests)")
    metrics = report["metrics"]
    table.add_row("/metrics cache", f"hits {metrics.get('cache_hits')}, misses {metrics.get('cache_misses')}")
    table.add_row("status codes (server log)", json.dumps(report["status_codes"]["server_request_log"]))
    table.add_row("5xx", str(report["server_5xx"]))
    console.print(table)
    console.print(f"wrote {args.out} and {args.screenshot} in {report['seconds']} s")


if __name__ == "__main__":
    main()
