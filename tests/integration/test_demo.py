"""The quick demo on the real default model, then `tailor serve` on its run folder with the official client."""

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI

from tests.unit.helpers import wait_until_healthy

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "tailor.cli.app", "demo", "--quick", "--no-serve", "--no-progress",
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"quick demo took {time.perf_counter() - started:.0f} s")
    return out, result.stdout


def test_quick_demo_customized_model_beats_base(demo_run):
    out, stdout = demo_run
    report = json.loads((out / "eval" / "report.json").read_text())
    base, tuned = report["models"]["base"], report["models"]["lora"]
    for metrics in (base, tuned):
        assert {"token_f1", "exact_match", "eval_loss", "perplexity"} <= set(metrics)
    print(f"base F1 {base['token_f1']:.3f}, tuned F1 {tuned['token_f1']:.3f}")
    assert tuned["eval_loss"] < base["eval_loss"]
    assert tuned["token_f1"] >= base["token_f1"] + 0.25
    assert "token_f1" in stdout and "lora" in stdout  # the side-by-side table is printed
    # every stage left its files and its manifest entry
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"ingest", "index", "data", "train", "eval"} <= set(manifest["stages"])
    assert (out / "corpus.jsonl").stat().st_size > 0 and (out / "adapter" / "adapter_config.json").is_file()


GROUNDED = [("What is the address of City Hall?", "city-hall.md"),
            ("How much does a marriage license cost?", "marriage-licenses.pdf"),
            ("How much does bulky item pickup cost?", "bulky-item-pickup.md")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tailor_serve(*args: str) -> tuple[subprocess.Popen, int]:
    """`tailor serve ARGS --port P` in a subprocess, once /health answers."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tailor.cli.app", "serve", *args, "--port", str(port)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", server, timeout=180)
    except AssertionError:
        server.terminate()
        raise
    return server, port


def test_openai_client_streams_from_tailor_serve(demo_run):
    out, _ = demo_run
    server, port = start_tailor_serve("--run", str(out), "-w", os.path.join(REPO, "examples", "city-services"))
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        assert {m.id for m in client.models.list().data} >= {"base", "lora"}
        stream = client.chat.completions.create(
            model="lora", stream=True, temperature=0, max_tokens=40,
            messages=[{"role": "user", "content": "What are the opening hours of City Hall?"}])
        events = list(stream)
        chunks = [c.choices[0].delta.content or "" for c in events if c.choices]
        answer = "".join(chunks)
        assert len([c for c in chunks if c]) > 3 and answer.strip()
        # feedback on that answer is stored in the run folder with the answer it rates
        ack = httpx.post(f"http://127.0.0.1:{port}/v1/feedback", timeout=10,
                         json={"response_id": events[0].id, "rating": "up"})
        assert ack.status_code == 200 and ack.json()["model"] == "lora"
        with sqlite3.connect(out / "feedback.db") as db:
            assert db.execute("SELECT answer, rating FROM feedback").fetchall() == [(answer, "up")]
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()["default"] == "lora"
        # the demo also serves `rag`: the base model answering from the index, each answer with its sources
        for question, document in GROUNDED:
            reply = client.chat.completions.create(model="rag", temperature=0, max_tokens=40,
                                                   messages=[{"role": "user", "content": question}])
            cited = reply.model_extra["citations"]
            assert cited and os.path.basename(cited[0]["source"]) == document, (question, cited)
            assert reply.choices[0].message.content.strip()
    finally:
        server.terminate()
        server.wait(timeout=30)


def tailor(*args: str, timeout: float = 900) -> str:
    result = subprocess.run([sys.executable, "-m", "tailor.cli.app", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "COLUMNS": "250"})  # tables unwrapped
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_city_model_promoted_and_rolled_back_while_tailor_serve_runs(demo_run, tmp_path):
    """The issue's lifecycle on the default model: the demo's run is version 1 of `city`, a second short training
    version 2; `tailor serve --registry` follows `tailor models promote` and `rollback` without a restart."""
    import shutil

    out, _ = demo_run
    workspace = shutil.copytree(os.path.join(REPO, "examples", "city-services"), tmp_path / "ws")
    with open(workspace / "tailor.yaml", "a") as config:
        config.write("registry:\n  poll_seconds: 0.5\n")
    second = tmp_path / "run2"
    shutil.copytree(out / "data", second / "data")
    tailor("train", "-w", str(workspace), "--run", str(second), "--no-progress", "train.max_steps=3",
           "train.save_every=0", "train.learning_rate=5e-3")
    for run in (out, second):
        tailor("models", "register", str(run), "--name", "city", "-w", str(workspace))
    server, port = start_tailor_serve("--registry", "-w", str(workspace), "--run", str(tmp_path / "no-run"))
    question = [{"role": "user", "content": "How do I renew a parking permit?"}]

    def ask() -> str | None:
        response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "model": "city", "messages": question, "temperature": 0, "max_tokens": 24})
        return response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else None

    def after(command: tuple[str, ...], differs_from: str | None) -> tuple[str, float]:
        """Run a registry command, then wait until `city` answers something other than `differs_from`."""
        tailor("models", *command, "-w", str(workspace), "--reason", "integration test")
        started = time.monotonic()
        while (answer := ask()) in (differs_from, None) and time.monotonic() - started < 60:
            time.sleep(0.2)
        return answer, time.monotonic() - started

    try:
        assert ask() is None  # registered, nothing in production yet: 404
        first, seconds_1 = after(("promote", "city", "1", "--stage", "production"), None)
        second_answer, seconds_2 = after(("promote", "city", "2", "--stage", "production"), first)
        back, seconds_back = after(("rollback", "city"), second_answer)
        print(f"v1 {first!r} after {seconds_1:.1f} s; v2 {second_answer!r} after {seconds_2:.1f} s; "
              f"rollback after {seconds_back:.1f} s")
        assert first and second_answer and second_answer != first
        assert back == first  # version 1's answer again, from the same server process
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=30)
    history = tailor("models", "history", "city", "-w", str(workspace))
    assert history.count("rollback") == 2 and history.count("integration test") == 5  # the audit log has it all
