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
    assert {"ingest", "data", "train", "eval"} <= set(manifest["stages"])
    assert (out / "corpus.jsonl").stat().st_size > 0 and (out / "adapter" / "adapter_config.json").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_client_streams_from_tailor_serve(demo_run):
    out, _ = demo_run
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tailor.cli.app", "serve", "--run", str(out), "--port", str(port),
                               "-w", os.path.join(REPO, "examples", "city-services")],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("tailor serve did not come up")
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
    finally:
        server.terminate()
        server.wait(timeout=30)
