"""`tailor serve` end to end: the official openai client against a real uvicorn server on the tiny model."""

from __future__ import annotations

import re
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

from tailor.errors import TailorError
from tailor.serve.app import bind_socket, create_app, serve
from tailor.serve.engine import Engine

QUESTION = [{"role": "user", "content": "Where do I renew a parking permit?"}]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> str:
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, weight in model.named_parameters():
        if "lora_B" in name:  # B starts at zero (a no-op adapter); perturb it so the adapter changes the output
            torch.nn.init.normal_(weight, std=1.0)
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    return str(folder)


def start_server(engine: Engine, host: str = "127.0.0.1") -> tuple[uvicorn.Server, str]:
    sock = bind_socket(host, 0)
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    return server, f"http://{host}:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_dir) -> Engine:
    return Engine(tiny_model_dir, adapters={"city.v1": adapter_dir}, dtype=torch.float32, max_new_tokens=16)


@pytest.fixture(scope="module")
def url(engine):
    server, url = start_server(engine)
    yield url
    server.should_exit = True


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def greedy(client, model: str = "base", **options) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=12, **options)


def test_completion_returns_text_and_usage(client):
    reply = greedy(client)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5
    assert 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_stream_joins_to_the_same_greedy_answer(client):
    chunks = list(client.chat.completions.create(model="base", messages=QUESTION, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] in ("stop", "length") and not any(finish[:-1])
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reply = greedy(client)
    assert streamed == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_models_lists_base_then_adapter_and_the_adapter_changes_the_answer(client):
    assert [m.id for m in client.models.list()] == ["base", "city.v1"]
    base, adapted = greedy(client, "base"), greedy(client, "city.v1")
    assert adapted.choices[0].message.content != base.choices[0].message.content
    assert greedy(client, "base").choices[0].message.content == base.choices[0].message.content  # base restored


def test_unknown_model_is_404_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as caught:
        greedy(client, "no-such-model")
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "no-such-model" in error["message"] and "city.v1" in error["message"]


def test_malformed_json_is_400_in_openai_shape(url):
    response = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": "base", "messages": [',
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert "not valid JSON" in response.json()["error"]["message"]


@pytest.mark.parametrize(("field", "value"), [("temperature", 5), ("top_p", 0), ("max_tokens", 0), ("n", 2),
                                              ("messages", [{"role": "bot", "content": "hi"}])])
def test_a_bad_field_is_400_naming_it(client, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{"model": "base", "messages": QUESTION, field: value})
    error = caught.value.body
    assert error["type"] == "invalid_request_error"
    assert error["param"].startswith(field) and field in error["message"]


def test_stop_string_ends_the_reply_before_it(engine):
    full = engine.stream("base", QUESTION, temperature=0, max_tokens=16)
    text = full.text()
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = engine.stream("base", QUESTION, temperature=0, max_tokens=16, stop=[stop])
    deltas = list(cut)
    assert "".join(deltas) == text[:text.index(stop)]
    assert cut.finish_reason == "stop" and cut.completion_tokens < full.completion_tokens


def test_seed_makes_sampling_repeatable(engine):
    def sample(seed):
        return engine.stream("base", QUESTION, temperature=1.0, top_p=0.9, max_tokens=8, seed=seed).text()

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_a_closed_stream_frees_the_model(engine):
    generation = engine.stream("base", QUESTION, temperature=0, max_tokens=16)
    next(generation)
    generation.close()  # what the server does when a client disconnects mid-reply
    assert engine.stream("base", QUESTION, temperature=0, max_tokens=2).text()


def test_port_in_use_is_a_clear_error(engine):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(TailorError, match=f"port {port} on 127.0.0.1 is already in use; pick another"):
            serve(engine, "127.0.0.1", port)


def test_chat_page_is_served_without_external_sources(url):
    response = httpx.get(f"{url}/")
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    page = response.text
    assert "/v1/chat/completions" in page and "/v1/models" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert not re.search(r"https?://", page)
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "models": ["base", "city.v1"]}


@pytest.mark.integration
def test_streamed_chat_with_the_default_model(default_model_dir):
    engine = Engine(default_model_dir, max_new_tokens=24)
    server, url = start_server(engine)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        stream = client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=24, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
        assert text.strip()
    finally:
        server.should_exit = True


def test_workspace_system_prompt_is_added_only_when_the_client_sends_none(tiny_model_dir):
    with_prompt = Engine(tiny_model_dir, system_prompt="Answer about Maplewood in one sentence.")
    plain = Engine(tiny_model_dir)
    question = [{"role": "user", "content": "Library hours?"}]
    own = [{"role": "system", "content": "Be terse."}, *question]
    explicit = [{"role": "system", "content": "Answer about Maplewood in one sentence."}, *question]
    added = with_prompt.stream("base", question, max_tokens=1)
    assert added.prompt_tokens == plain.stream("base", explicit, max_tokens=1).prompt_tokens
    assert added.prompt_tokens != plain.stream("base", question, max_tokens=1).prompt_tokens
    assert with_prompt.stream("base", own, max_tokens=1).prompt_tokens == plain.stream("base", own,
                                                                                        max_tokens=1).prompt_tokens
