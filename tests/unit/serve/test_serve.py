"""`tailor serve` end to end: the official openai client against a real uvicorn server on the tiny model: chat and
legacy completions, models, metrics, the response cache, feedback, A/B aliases and runtime adapters."""

from __future__ import annotations

import json
import re
import socket
import sqlite3

import httpx
import openai
import pytest
import torch

from tailor.config import ServeConfig
from tailor.errors import TailorError
from tailor.serve.app import serve
from tailor.serve.engine import Engine
from tests.unit.helpers import start_server

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


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_dir) -> Engine:
    engine = Engine(tiny_model_dir, adapters={"city.v1": adapter_dir}, dtype=torch.float32, max_new_tokens=16,
                    speculative_tokens=4)  # on, as it is for bf16 weights
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    config = ServeConfig(aliases={"city-bot": {"base": 1, "city.v1": 1}}, rate_limit="10000/minute")
    server, url = start_server(engine, config=config, root=root)
    yield url, root
    server.should_exit = True


@pytest.fixture(scope="module")
def url(served) -> str:
    return served[0]


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
    assert [m.id for m in client.models.list()] == ["base", "city.v1", "city-bot"]
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


def test_legacy_completion_streamed_and_whole_agree(client):
    whole = client.completions.create(model="base", prompt="The city library opens at", temperature=0, max_tokens=8)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].text and whole.usage.completion_tokens <= 8
    chunks = list(client.completions.create(model="base", prompt="The city library opens at", temperature=0,
                                            max_tokens=8, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def metric(url: str, name: str, **labels) -> float:
    """A sample's value from /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_deterministic_requests_are_cached_and_counted(client, url):
    question = [{"role": "user", "content": "Is the cache warm for bulky waste pickup?"}]
    hits, misses = metric(url, "tailor_cache_hits_total"), metric(url, "tailor_cache_misses_total")
    first = client.chat.completions.create(model="base", messages=question, temperature=0, max_tokens=6)
    second = client.chat.completions.create(model="base", messages=question, temperature=0, max_tokens=6)
    assert second.choices[0].message.content == first.choices[0].message.content and second.id != first.id
    assert metric(url, "tailor_cache_misses_total") == misses + 1
    assert metric(url, "tailor_cache_hits_total") == hits + 1
    # sampling without a seed is never served from the cache
    client.chat.completions.create(model="base", messages=question, temperature=1.0, max_tokens=2)
    assert metric(url, "tailor_cache_hits_total") == hits + 1


def test_metrics_report_latency_tokens_and_errors_per_model(client, url):
    greedy(client, "city.v1")
    assert metric(url, "tailor_time_to_first_token_seconds_count", model="city.v1") >= 1
    assert metric(url, "tailor_inter_token_latency_seconds_count", model="city.v1") >= 1
    assert metric(url, "tailor_generated_tokens_total", model="city.v1") >= 1
    assert metric(url, "tailor_tokens_per_second_count", model="city.v1") >= 1
    steps, drafted = metric(url, "tailor_speculative_tokens", kind="steps"), metric(url, "tailor_speculative_tokens",
                                                                                    kind="drafted")
    # a lone greedy request (a new question: not from the cache) checks prompt-lookup drafts; the tiny model repeats
    client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Speculate on parks, parks?"}],
                                   temperature=0, max_tokens=12)
    assert metric(url, "tailor_speculative_tokens", kind="steps") > steps
    assert metric(url, "tailor_speculative_tokens", kind="drafted") > drafted
    errors = metric(url, "tailor_errors_total", model="-", status="404")
    with pytest.raises(openai.NotFoundError):
        greedy(client, "no-such-model")
    assert metric(url, "tailor_errors_total", model="-", status="404") == errors + 1


def test_feedback_is_stored_with_the_completion_it_rates(client, served):
    url, root = served
    reply = greedy(client, "city.v1", user="resident-7")
    response = httpx.post(f"{url}/v1/feedback", json={"response_id": reply.id, "rating": "down",
                                                     "correction": "Renew it at City Hall, room 12.",
                                                     "comment": "wrong office"})
    assert response.status_code == 200 and response.json()["model"] == "city.v1"
    with sqlite3.connect(root / "feedback.db") as db:
        row = db.execute("SELECT model, prompt, answer, rating, correction, comment, user FROM feedback "
                         "WHERE response_id = ?", (reply.id,)).fetchone()
    model, prompt, answer, rating, correction, comment, user = row
    assert (model, rating, correction, comment, user) == ("city.v1", "down", "Renew it at City Hall, room 12.",
                                                          "wrong office", "resident-7")
    assert json.loads(prompt) == QUESTION and answer == reply.choices[0].message.content
    unknown = httpx.post(f"{url}/v1/feedback", json={"response_id": "chatcmpl-nope", "rating": "up"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "response_id"
    bad = httpx.post(f"{url}/v1/feedback", json={"response_id": reply.id, "rating": "meh"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"


def test_streamed_completions_are_recorded_for_feedback(client, served):
    url, root = served
    chunks = list(client.chat.completions.create(model="base", messages=QUESTION, max_tokens=4, stream=True,
                                                 seed=3))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    with sqlite3.connect(root / "feedback.db") as db:
        assert db.execute("SELECT answer FROM completions WHERE id = ?", (chunks[0].id,)).fetchone() == (text,)
    assert httpx.post(f"{url}/v1/feedback", json={"response_id": chunks[0].id, "rating": "up"}).status_code == 200


def test_alias_splits_users_stickily_between_versions(client):
    def served_by(user):
        return client.chat.completions.create(model="city-bot", messages=QUESTION, max_tokens=1, temperature=0,
                                              user=user).model

    picks = {user: served_by(user) for user in (f"user-{i}" for i in range(12))}
    assert set(picks.values()) == {"base", "city.v1"}  # both versions get traffic at 50/50
    assert all(served_by(user) == model for user, model in list(picks.items())[:4])  # sticky


def test_adapters_are_added_and_removed_at_runtime(client, url, adapter_dir):
    added = httpx.post(f"{url}/v1/admin/adapters", json={"name": "city.v2", "path": adapter_dir})
    assert added.status_code == 201 and added.json()["id"] == "city.v2"
    assert "city.v2" in [m.id for m in client.models.list()]
    assert greedy(client, "city.v2").choices[0].message.content == greedy(client, "city.v1").choices[0].message.content
    missing = httpx.post(f"{url}/v1/admin/adapters", json={"name": "broken", "path": "/no/such/folder"})
    assert missing.status_code == 400 and "/no/such/folder" in missing.json()["error"]["message"]
    assert httpx.delete(f"{url}/v1/admin/adapters/city.v2").status_code == 204
    with pytest.raises(openai.NotFoundError):
        greedy(client, "city.v2")
    assert httpx.delete(f"{url}/v1/admin/adapters/city.v2").status_code == 404


def test_openapi_schema_lists_the_endpoints(url):
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/feedback", "/v1/admin/adapters",
            "/health"} <= set(paths)


# --- log-probabilities ------------------------------------------------------------------------------------------

def reference_logprobs(engine: Engine, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, from one plain forward pass of the served base model."""
    with torch.inference_mode():
        logits = engine.customizations.backbones["base"](input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_chat_logprobs_are_the_models_own_and_greedy_tokens_top_the_list(client, engine):
    reply = greedy(client, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(item.token for item in content) == reply.choices[0].message.content
    for item in content:  # greedy: each chosen token is the most likely one, and it heads the alternatives
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert item.top_logprobs[0].token == item.token and item.top_logprobs[0].logprob == item.logprob
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob >= item.top_logprobs[2].logprob
        assert bytes(item.bytes).decode() == item.token
    plain = greedy(client)  # speculation stays on without logprobs: the same text
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == reply.choices[0].message.content


def test_echoed_prompt_logprobs_match_a_forward_pass_as_lm_eval_reads_them(client, engine):
    tokenizer = engine.tokenizer
    context = tokenizer("The pool opens in June", add_special_tokens=False)["input_ids"]
    continuations = [tokenizer(" and closes in May.", add_special_tokens=False)["input_ids"],
                     tokenizer(" on Fridays", add_special_tokens=False)["input_ids"]]
    prompts = [context + continuation for continuation in continuations]
    # lm-evaluation-harness's loglikelihood request: token ids, one token generated, the prompt echoed and scored
    reply = client.completions.create(model="base", prompt=prompts, max_tokens=1, temperature=0, logprobs=1,
                                      echo=True, seed=1234)
    assert [choice.index for choice in reply.choices] == [0, 1]
    for choice, ids in zip(reply.choices, prompts, strict=True):
        scored = choice.logprobs
        assert len(scored.tokens) == len(ids) + 1 and scored.token_logprobs[0] is None
        assert choice.text.startswith(tokenizer.decode(ids))
        expected = reference_logprobs(engine, ids)
        got = torch.tensor(scored.token_logprobs[1:len(ids)])
        assert torch.allclose(got, expected, atol=1e-4), (got, expected)
        # what lm-eval sums for the continuation, and its is-greedy check against the top alternative
        continuation = scored.token_logprobs[len(context):-1]
        assert len(continuation) == len(ids) - len(context)
        for logprob, top in zip(scored.token_logprobs[1:-1], scored.top_logprobs[1:-1], strict=True):
            assert len(top) == 1 and max(top.values()) >= logprob
        assert scored.text_offset[0] == 0 and scored.text_offset == sorted(scored.text_offset)


def test_an_engine_without_logprobs_refuses_them_with_a_400_naming_the_field(client, engine, monkeypatch):
    """vLLM and llama.cpp declare `supports_logprobs = False`: the OpenAI layer refuses before the engine runs."""
    monkeypatch.setattr(engine, "supports_logprobs", False)
    monkeypatch.setattr(engine, "kind", "llama_cpp")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="base", messages=QUESTION, logprobs=True, max_tokens=2)
    assert caught.value.body["param"] == "logprobs" and "serve.engine llama_cpp" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="base", prompt="Hello", logprobs=1, echo=True, max_tokens=1)
    assert caught.value.body["param"] == "logprobs"
    assert client.completions.create(model="base", prompt="Hello", max_tokens=1).choices[0].text is not None


def test_logprob_options_that_cannot_be_served_are_400_naming_them(client, url):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="base", messages=QUESTION, top_logprobs=2)
    assert caught.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="base", messages=QUESTION, logprobs=True, stream=True)
    assert caught.value.body["param"] == "logprobs" and "stream" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="base", prompt=[[1, 2], [10 ** 9]], max_tokens=1)
    assert caught.value.body["param"] == "prompt[1]" and "vocabulary" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="base", prompt=["a", "b"], max_tokens=1, stream=True)
    assert caught.value.body["param"] == "prompt"


@pytest.mark.parametrize("engine_reason, reported", [("stop", "stop"), ("length", "length"), ("timeout", "length"),
                                                     ("cancelled", "stop"), ("abort", "stop")])
def test_every_engine_finish_reason_becomes_one_openai_knows(engine_reason, reported):
    """vLLM ends an aborted request with "abort": passed through, it failed the response schema (a 500)."""
    from tailor.serve.openai.serving import _outcome
    from tailor.serve.protocol import Generation

    generation = Generation("base", prompt_tokens=3)
    generation.finish_reason, generation.completion_tokens = engine_reason, 2
    assert _outcome(generation, None) == (reported, 3, 2)


def test_a_vanishing_temperature_samples_the_greedy_token_instead_of_failing():
    """logits / 1e-300 overflow to inf and softmax to NaN: torch.multinomial raised, a 500 (found by Schemathesis)."""
    import torch

    from tailor.serve.sampling import pick

    logits = torch.tensor([0.1, 2.0, -1.0, 1.5])
    assert pick(logits, 1e-300, 1.0, None) == 1 and pick(logits, 1e-45, 0.5, None) == 1
