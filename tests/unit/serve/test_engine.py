"""The batched serving engine on the tiny model: batched greedy decoding equals one-at-a-time decoding with every
kind of customization mixed in one batch; rows join and leave between steps; a bounded queue, cancellation,
timeouts, raw completion, and adapters added, replaced and removed while serving."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from tailor.errors import TailorError
from tailor.models.base import load_tokenizer
from tailor.serve.batching import GROW_COLUMNS
from tailor.serve.engine import Engine, PromptTooLongError, QueueFullError, UnknownModelError, UnsupportedRequestError

QUESTIONS = ["Where do I renew a parking permit?", "Library hours?",
             "How do I report a pothole on my street, and how long does the repair usually take?",
             "Trash pickup day?", "Who do I call about a broken streetlight near the park entrance?", "Hi",
             "Is city hall open on Saturdays?"]


def _lora(tiny_model_dir: str, folder: Path, seed: int, targets: list[str]) -> str:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    for name, weight in model.named_parameters():
        if "lora_B" in name:  # B starts at zero (a no-op adapter); perturb it so the adapter changes the output
            torch.nn.init.normal_(weight, std=1.0)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def customizations(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("customizations")
    torch.manual_seed(3)
    tuned = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    tuned.prompt_encoder["default"].embedding.weight.data.normal_(std=1.0)
    tuned.save_pretrained(root / "soft")
    prefixed = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                   peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    prefixed.save_pretrained(root / "prefix")
    return {"prefix": str(root / "prefix"), "city": _lora(tiny_model_dir, root / "city", 1, ["q_proj", "v_proj"]),
            "parks": _lora(tiny_model_dir, root / "parks", 2, ["q_proj", "k_proj", "o_proj", "down_proj"]),
            "soft": str(root / "soft")}


@pytest.fixture(scope="module")
def engine(tiny_model_dir, customizations) -> Engine:
    # speculation on (float32 would leave it off): a lone greedy row checks prompt-lookup drafts in these tests
    engine = Engine(tiny_model_dir, adapters=customizations, dtype=torch.float32, max_new_tokens=12,
                    max_batch_size=8, max_queue=8, speculative_tokens=4)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def prompt_ids(engine: Engine, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


@functools.lru_cache(maxsize=8)
def _reference_model(model_dir: str, folder: str | None):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return (peft.PeftModel.from_pretrained(model, folder) if folder is not None else model).eval()


def reference(tiny_model_dir: str, folder: str | None, ids: list[int], max_new_tokens: int, stops: set[int]) -> str:
    """One request alone through plain transformers/PEFT `generate`: the answer batching must reproduce."""
    model = _reference_model(tiny_model_dir, folder)
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(stops),
                             pad_token_id=0)
    new = [t for t in out[0, len(ids):].tolist() if t not in stops]
    return load_tokenizer(tiny_model_dir).decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_batched_greedy_equals_one_at_a_time_with_mixed_customizations(engine, tiny_model_dir, customizations):
    names = ["base", "city", "parks", "soft", "prefix", "soft", "city"]
    # the decode thread admits nothing until every request is queued: one mixed batch
    with engine.scheduler.condition:
        replies = [engine.stream(name, [{"role": "user", "content": q}], temperature=0, max_tokens=10)
                   for name, q in zip(names, QUESTIONS, strict=True)]
    texts = [reply.text() for reply in replies]
    assert engine.stats()["peak_batch_size"] == len(names)
    for name, question, text, reply in zip(names, QUESTIONS, texts, replies, strict=True):
        expected = reference(tiny_model_dir, customizations.get(name), prompt_ids(engine, question), 10,
                             engine.end_of_turn_ids)
        assert text == expected, (name, question)
        assert reply.finish_reason in ("stop", "length") and reply.completion_tokens > 0
        assert reply.first_token_at is not None and reply.finished_at >= reply.first_token_at
        assert len(reply.token_times) == reply.completion_tokens


def test_batches_of_one_adapter_or_none_take_the_plain_forward_and_still_match(engine, tiny_model_dir,
                                                                             customizations):
    """A batch whose rows agree runs with its adapter active (or the adapter layers off) instead of PEFT's per-row
    split; switching between such batches and mixed ones must not leak one adapter into another's rows."""
    plan = [["city", "city"], ["base"], ["parks", "parks", "parks"], ["city", "base", "parks"], ["base", "base"],
            ["city"]]
    routes = []
    for names in plan:
        with engine.scheduler.condition:  # queued together: one batch
            replies = [engine.stream(name, [{"role": "user", "content": q}], temperature=0, max_tokens=6)
                       for name, q in zip(names, QUESTIONS[:len(names)], strict=True)]
        texts = [reply.text() for reply in replies]
        routes.append(engine.customizations.lora_route)
        for name, question, text in zip(names, QUESTIONS[:len(names)], texts, strict=True):
            assert text == reference(tiny_model_dir, customizations.get(name), prompt_ids(engine, question), 6,
                                     engine.end_of_turn_ids), (names, name)
    keys = {name: engine.customizations.models[name].adapter_key for name in ("city", "parks")}
    assert routes == [keys["city"], "__base__", keys["parks"], "mixed", "__base__", keys["city"]]


def test_a_request_joins_a_running_batch_mid_reply(engine, tiny_model_dir, customizations):
    # long enough to outgrow the cache's first buffers (batching.GrowingLayer) while the other row joins and leaves
    long = engine.stream("city", [{"role": "user", "content": QUESTIONS[0]}], temperature=0,
                         max_tokens=GROW_COLUMNS + 16)
    first = next(long)
    late = engine.stream("soft", [{"role": "user", "content": QUESTIONS[1]}], temperature=0, max_tokens=6)
    late_text = late.text()
    long_text = first + long.text()
    assert late.finished_at < long.finished_at  # it joined and left while the long reply was still decoding
    assert long.completion_tokens > GROW_COLUMNS
    assert long_text == reference(tiny_model_dir, customizations["city"], prompt_ids(engine, QUESTIONS[0]),
                                  GROW_COLUMNS + 16, engine.end_of_turn_ids)
    assert late_text == reference(tiny_model_dir, customizations["soft"], prompt_ids(engine, QUESTIONS[1]), 6,
                                  engine.end_of_turn_ids)


def test_a_lone_greedy_request_speculates_and_answers_as_generate_does(engine, tiny_model_dir, customizations):
    """Prompt-lookup drafts checked in one forward pass, with every kind of customization: the reply is `generate`'s,
    draft tokens were accepted (the tiny model repeats itself) and rejected ones left the cache."""
    before = dict(engine.stats()["speculation"])
    for name in ("base", "city", "soft", "prefix"):
        for question in QUESTIONS[:3]:
            reply = engine.stream(name, [{"role": "user", "content": question}], temperature=0, max_tokens=30)
            assert reply.text() == reference(tiny_model_dir, customizations.get(name), prompt_ids(engine, question),
                                             30, engine.end_of_turn_ids), (name, question)
            assert len(reply.token_times) == reply.completion_tokens
    after = engine.stats()["speculation"]
    steps, drafted, accepted = (after[k] - before[k] for k in ("steps", "drafted", "accepted"))
    assert steps > 0 and 0 < accepted < drafted
    # a stop string met inside accepted draft tokens still cuts the reply there
    full = engine.stream("base", [{"role": "user", "content": QUESTIONS[0]}], temperature=0, max_tokens=30).text()
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = engine.stream("base", [{"role": "user", "content": QUESTIONS[0]}], temperature=0, max_tokens=30,
                        stop=[stop])
    assert cut.text() == full[:full.index(stop)] and cut.finish_reason == "stop"


def test_complete_continues_raw_text(engine, tiny_model_dir, customizations, tokenizer):
    prompt = "The library opens at"
    reply = engine.complete("parks", prompt, temperature=0, max_tokens=8)
    assert reply.text() == reference(tiny_model_dir, customizations["parks"], tokenizer(prompt)["input_ids"], 8,
                                     engine.end_of_turn_ids)
    assert reply.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    with pytest.raises(UnknownModelError, match="'nope' does not exist"):
        engine.complete("nope", prompt)
    with pytest.raises(UnsupportedRequestError, match="prompt: must not be empty"):
        engine.complete("base", "")
    with pytest.raises(PromptTooLongError, match="prompt: the prompt is"):
        engine.complete("base", "word " * 1100)


def test_a_cancelled_request_frees_its_row(tiny_model_dir):
    engine = Engine(tiny_model_dir, dtype=torch.float32, max_batch_size=1, max_queue=1)
    try:
        hog = engine.stream("base", [{"role": "user", "content": "Hi"}], temperature=0, max_tokens=900)
        next(hog)
        waiting = engine.stream("base", [{"role": "user", "content": "Hi"}], temperature=0, max_tokens=3)
        hog.close()  # the client went away: its row leaves before the next step, and the waiting one gets it
        assert waiting.text() and waiting.finish_reason in ("stop", "length")
        assert hog.finish_reason == "cancelled" and hog.completion_tokens < 900
        assert list(hog) == []
        assert engine.stats()["running"] == 0
    finally:
        engine.shutdown()


def test_a_full_queue_refuses_with_a_retry_hint(tiny_model_dir):
    engine = Engine(tiny_model_dir, dtype=torch.float32, max_batch_size=1, max_queue=1)
    try:
        question = [{"role": "user", "content": "Hi"}]
        # nothing is admitted while we hold it: one decoding slot and one queue place
        with engine.scheduler.condition:
            accepted = [engine.stream("base", question, max_tokens=2) for _ in range(2)]
            with pytest.raises(QueueFullError, match="the server is busy") as caught:
                engine.stream("base", question, max_tokens=2)
        assert caught.value.retry_after > 0
        assert all(reply.text() is not None and reply.finish_reason for reply in accepted)
        engine.stream("base", question, max_tokens=2).text()  # room again once they finished
    finally:
        engine.shutdown()


def test_timeouts_end_the_reply_with_what_was_generated(engine):
    question = [{"role": "user", "content": "Hi"}]
    slow = engine.stream("base", question, temperature=0, max_tokens=1000, timeout=0.3)
    text = slow.text()
    assert slow.finish_reason == "timeout" and 0 < slow.completion_tokens < 1000 and text
    expired = engine.stream("base", question, max_tokens=5, timeout=1e-6)
    assert expired.text() == "" and expired.finish_reason == "timeout"


def test_adapters_are_added_replaced_and_removed_while_serving(tiny_model_dir, customizations, tmp_path):
    engine = Engine(tiny_model_dir, dtype=torch.float32, max_new_tokens=8)
    try:
        question = [{"role": "user", "content": QUESTIONS[2]}]
        ids = prompt_ids(engine, QUESTIONS[2])
        engine.add_adapter("city", customizations["city"])
        engine.add_adapter("soft", customizations["soft"])
        assert engine.model_names() == ["base", "city", "soft"]
        running_old = engine.stream("city", question, temperature=0, max_tokens=30)
        first = next(running_old)
        engine.add_adapter("city", customizations["parks"])  # a new version under the same name
        new = engine.stream("city", question, temperature=0, max_tokens=8).text()
        assert new == reference(tiny_model_dir, customizations["parks"], ids, 8, engine.end_of_turn_ids)
        # the request that started on the old version finished on it
        assert first + running_old.text() == reference(tiny_model_dir, customizations["city"], ids, 30,
                                                       engine.end_of_turn_ids)
        deadline = time.monotonic() + 5
        backbones = engine.customizations.backbones
        while len(backbones["base"].peft_config) != 1:  # the old version is unloaded once unused
            assert time.monotonic() < deadline
            time.sleep(0.01)
        engine.remove_adapter("city")
        engine.remove_adapter("soft")
        assert engine.model_names() == ["base"]
        with pytest.raises(UnknownModelError):
            engine.stream("city", question)
        # no adapter left: the plain model
        assert not isinstance(engine.customizations.backbones["base"], peft.PeftModel)
        engine.add_adapter("again", customizations["city"])  # the emptied PEFT model takes adapters again
        assert engine.stream("again", question, temperature=0, max_tokens=8).text() == \
            reference(tiny_model_dir, customizations["city"], ids, 8, engine.end_of_turn_ids)
        with pytest.raises(TailorError, match="is not a PEFT adapter folder"):
            engine.add_adapter("broken", tmp_path)
        with pytest.raises(TailorError, match="taken by the base model"):
            engine.add_adapter("base", customizations["city"])
    finally:
        engine.shutdown()


def test_a_whole_model_folder_is_served_beside_the_base(tiny_model_dir, customizations, tmp_path):
    merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                            customizations["parks"]).merge_and_unload()
    merged.save_pretrained(tmp_path / "full")
    load_tokenizer(tiny_model_dir).save_pretrained(tmp_path / "full")
    engine = Engine(tiny_model_dir, adapters={"full": str(tmp_path / "full"), "city": customizations["city"]},
                    dtype=torch.float32)
    try:
        question = [{"role": "user", "content": QUESTIONS[0]}]
        with engine.scheduler.condition:
            full, city = (engine.stream(name, question, temperature=0, max_tokens=8) for name in ("full", "city"))
        ids = prompt_ids(engine, QUESTIONS[0])
        assert full.text() == reference(str(tmp_path / "full"), None, ids, 8, engine.end_of_turn_ids)
        assert city.text() == reference(tiny_model_dir, customizations["city"], ids, 8, engine.end_of_turn_ids)
    finally:
        engine.shutdown()


def test_prompt_table_rows_are_served_as_soft_prompts(engine, tiny_model_dir, customizations, tmp_path):
    from safetensors.torch import load_file

    from tailor.methods.p_tuning import PROMPT_TABLE, add_to_prompt_table

    soft = load_file(str(Path(customizations["soft"]) / "adapter_model.safetensors"))["prompt_embeddings"]
    add_to_prompt_table(tmp_path, "permits", soft, "tiny")
    assert engine.add_prompt_table(tmp_path / PROMPT_TABLE) == ["permits"]
    question = [{"role": "user", "content": QUESTIONS[3]}]
    assert engine.stream("permits", question, temperature=0, max_tokens=6).text() == \
        engine.stream("soft", question, temperature=0, max_tokens=6).text()
    engine.remove_adapter("permits")


@pytest.mark.parametrize(("kind", "package", "pip_name"), [("vllm", "vllm", "vllm"),
                                                            ("llama_cpp", "llama", "llama-cpp-cffi")])
def test_optional_engines_name_their_missing_package(kind, package, pip_name, monkeypatch):
    import sys

    from tailor.serve.external import create_engine

    monkeypatch.setitem(sys.modules, package, None)  # as if not installed, whether it is or not
    with pytest.raises(TailorError, match=f"serve.engine: {kind} needs the package {pip_name}"):
        create_engine(kind, "model.gguf")


def _engine_classes() -> list[type]:
    from tailor.serve.external import LlamaCppEngine, VllmEngine

    return [Engine, VllmEngine, LlamaCppEngine]


@pytest.mark.parametrize("engine_class", _engine_classes(), ids=lambda cls: cls.__name__)
def test_every_engine_implements_the_serving_protocol(engine_class):
    """Each engine subclasses ServingEngine explicitly, implements every method with the protocol's parameters
    (names, kinds and defaults: the OpenAI layer passes them by keyword) and sets every data member, capabilities
    included, so the OpenAI layer never has to ask whether an engine has something."""
    import inspect

    from tailor.serve.protocol import ServingEngine

    assert ServingEngine in engine_class.__mro__ and not engine_class.__abstractmethods__  # explicitly
    methods = {name: member for name, member in vars(ServingEngine).items()
               if inspect.isfunction(member) and not name.startswith("_")}
    assert {"stream", "complete", "model_names", "outside_vocabulary", "close"} <= set(methods)
    for name, declared in methods.items():
        implemented = getattr(engine_class, name)
        assert implemented is not declared, f"{engine_class.__name__}.{name} is the protocol's stub"
        expected = [(p.name, p.kind, p.default) for p in inspect.signature(declared).parameters.values()]
        found = [(p.name, p.kind, p.default) for p in inspect.signature(implemented).parameters.values()]
        assert found == expected, f"{engine_class.__name__}.{name}"
    init = "".join(inspect.getsource(cls.__init__) for cls in engine_class.__mro__ if "__init__" in vars(cls)
                   and cls.__module__.startswith("tailor."))
    for name in ServingEngine.__annotations__:
        assert any(name in vars(cls) for cls in engine_class.__mro__ if cls is not ServingEngine) \
            or f"self.{name} =" in init, f"{engine_class.__name__} never sets {name}"
    assert isinstance(engine_class.supports_logprobs, bool) and isinstance(engine_class.kind, str)


def test_the_built_in_engine_is_a_serving_engine_at_run_time(engine):
    from tailor.serve.protocol import ServingEngine

    assert isinstance(engine, ServingEngine) and engine.supports_logprobs and engine.kind == "tailor"
    assert all(hasattr(engine, name) for name in ServingEngine.__annotations__)
    assert engine.outside_vocabulary([0, 5, len(engine.tokenizer)]) == (2, len(engine.tokenizer))


def test_the_openai_layer_asks_the_engine_nothing_outside_the_protocol():
    """No getattr/hasattr on the engine in the HTTP layer: what an engine cannot do is a declared capability."""
    import ast
    import inspect

    import tailor.serve.app
    import tailor.serve.openai.routes
    import tailor.serve.openai.serving
    import tailor.serve.registry_watch

    for module in (tailor.serve.app, tailor.serve.openai.routes, tailor.serve.openai.serving,
                   tailor.serve.registry_watch):
        tree = ast.parse(inspect.getsource(module))
        sniffing = [ast.unparse(node) for node in ast.walk(tree)
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr") and "engine" in ast.unparse(node.args[0])]
        assert sniffing == [], module.__name__
        assert "tailor.serve.engine" not in inspect.getsource(module)  # typed against the protocol alone
    assert tailor.serve.openai.serving.Services.__annotations__["engine"] == "ServingEngine"
