"""The `prompt` method: few-shot examples retrieved with the real MiniLM embedding model, a profile that round-trips,
evaluated and served like a trained method, and nothing trained."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tailor.cli.serving import run_profiles
from tailor.config import validate_config
from tailor.errors import TailorError
from tailor.evaluate.harness import run_eval
from tailor.methods.artifacts import load_for_inference
from tailor.methods.kinds import PROMPT
from tailor.methods.prompt import (
    CHAIN_OF_THOUGHT,
    EMBEDDINGS_FILE,
    PROFILE_FILE,
    PromptOptions,
    apply_profile,
    build_profile,
    default_embedding_model,
    load_profile,
    save_profile,
)
from tailor.models.export import read_trained_run
from tailor.serve.engine import Engine
from tailor.train.run import BuildResult, run_training
from tailor.workspace import write_jsonl

FACTS = [("When is the public library open?", "Monday to Friday, 9 am to 7 pm."),
         ("How much is a parking permit?", "A parking permit costs $45 per year."),
         ("What is city hall's phone number?", "Call (555) 201-4400."),
         ("Which day is trash collected?", "Trash is collected every Tuesday morning."),
         ("Where can I pay a water bill?", "Pay water bills online or at the Utilities office, 12 Elm St.")]
SYSTEM = "Answer in one sentence."


def chat(question, answer=None):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
    return messages + [{"role": "assistant", "content": answer}] if answer is not None else messages


@pytest.fixture(scope="module")
def profile():
    # repeated records: one question must fill one of the k slots, not several
    conversations = [chat(*fact) for fact in FACTS] + [chat(*FACTS[0])]
    return build_profile(conversations, PromptOptions(k_shots=2), SYSTEM)


def test_retrieval_puts_the_nearest_training_examples_before_the_question(profile):
    assert profile.embedding_model == default_embedding_model()
    assert [example["question"] for example in profile.examples] == [question for question, _ in FACTS]
    assert profile.embeddings.shape == (5, 384)
    torch.testing.assert_close(profile.embeddings.norm(dim=1), torch.ones(5))

    messages = apply_profile(profile, chat("What time does the library open on Saturday?"))
    assert messages[0] == {"role": "system", "content": SYSTEM}  # the profile's system message replaces "Be brief."
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    # the nearest example sits last, right before the question; its answer is the training answer
    assert messages[3:5] == [{"role": "user", "content": FACTS[0][0]}, {"role": "assistant", "content": FACTS[0][1]}]
    assert messages[-1] == {"role": "user", "content": "What time does the library open on Saturday?"}

    # a different question retrieves a different nearest example
    assert apply_profile(profile, chat("How do I pay my water bill?"))[3]["content"] == FACTS[4][0]


def test_chain_of_thought_and_zero_shots():
    profile = build_profile([chat(*fact) for fact in FACTS[:2]],
                            PromptOptions(k_shots=0, chain_of_thought=True, system_prompt="Be exact."), SYSTEM)
    assert apply_profile(profile, chat("Is the pool open?")) == [
        {"role": "system", "content": f"Be exact.\n\n{CHAIN_OF_THOUGHT}"},
        {"role": "user", "content": "Is the pool open?"}]


def test_profile_round_trips(profile, tmp_path):
    save_profile(profile, tmp_path)
    assert {path.name for path in tmp_path.iterdir()} == {PROFILE_FILE, EMBEDDINGS_FILE}
    loaded = load_profile(tmp_path)
    assert torch.equal(loaded.embeddings, profile.embeddings)
    assert (loaded.system_prompt, loaded.k_shots, loaded.examples) == (SYSTEM, 2, profile.examples)
    question = chat("Can I pay for parking online?")
    assert apply_profile(loaded, question) == apply_profile(profile, question)


def test_a_profile_with_mismatched_embeddings_stops_with_one_message(profile, tmp_path):
    save_profile(profile, tmp_path)
    data = json.loads((tmp_path / PROFILE_FILE).read_text())
    data["examples"].pop()
    (tmp_path / PROFILE_FILE).write_text(json.dumps(data))
    with pytest.raises(TailorError, match="5 embeddings for 4 examples"):
        load_profile(tmp_path)


def weights_digest(model_dir) -> str:
    return hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()


def test_build_trains_nothing_and_eval_reports_a_prompt_column(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"messages": chat(*fact)} for fact in FACTS[:3]])
    write_jsonl(tmp_path / "data" / "eval.jsonl", [{"messages": chat(*fact)} for fact in FACTS[3:]])
    config = validate_config({"base_model": tiny_model_dir, "train": {"method": "prompt", "dtype": "fp32"},
                              "methods": {"prompt": {"k_shots": 2}}, "eval": {"max_new_tokens": 3, "batch_size": 2}})
    weights_before = weights_digest(tiny_model_dir)

    result = run_training(config, tmp_path, tmp_path, show_progress=False)
    assert isinstance(result, BuildResult) and result.examples == 3
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / PROMPT.folder / PROFILE_FILE).is_file() and (tmp_path / PROMPT.folder / "tailor.yaml").is_file()
    train_stage = json.loads((tmp_path / "manifest.json").read_text())["stages"]["train"]
    assert train_stage["method"] == "prompt" and train_stage["metrics"]["examples"] == 3
    assert train_stage["metrics"]["seconds"] >= 0

    # "base" and "prompt" are one model with the base's weights; only the conversations differ
    models = load_for_inference(config, tmp_path, tiny_model_dir, torch.float32)
    assert models.names == ["base", "prompt"]
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    with models.use("prompt") as model:
        assert all(torch.equal(value, plain[key]) for key, value in model.state_dict().items())
    assert weights_digest(tiny_model_dir) == weights_before
    assert len(models.messages_for("prompt", chat(FACTS[3][0]))) == 6  # system + 2 examples + the question
    assert models.messages_for("base", chat(FACTS[3][0])) == chat(FACTS[3][0])

    report = run_eval(config, tmp_path, tmp_path, show_progress=False, write_html=False)
    assert list(report["models"]) == ["base", "prompt"] and report["method"] == "prompt"
    # the loss is on the same answer tokens, now after the few-shot context: a different number
    assert report["models"]["base"]["eval_loss"] != report["models"]["prompt"]["eval_loss"]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [row["model"] for row in rows] == ["base", "base", "prompt", "prompt"]

    # `tailor serve` on this run serves the profile under the method's name; there are no weights to export
    served = run_profiles(config, tmp_path)
    assert list(served) == ["prompt"] and served["prompt"].examples == models.profile.examples
    with pytest.raises(TailorError, match="prompt: changes no weights, so there is no model to export"):
        read_trained_run(tmp_path)


@pytest.fixture
def adapter_dir(tiny_model_dir, tmp_path) -> str:
    import peft

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, weight in model.named_parameters():
        if "lora_B" in name:  # B starts at zero (a no-op adapter); perturb it so the adapter changes the output
            torch.nn.init.normal_(weight, std=1.0)
    model.save_pretrained(tmp_path)
    return str(tmp_path)


def test_engine_serves_a_profile_on_the_base_model(profile, tiny_model_dir, adapter_dir):
    engine = Engine(tiny_model_dir, adapters={"city.v1": adapter_dir}, profiles={"prompt": profile},
                    dtype=torch.float32, max_new_tokens=6)
    assert engine.model_names() == ["base", "city.v1", "prompt"]
    question = [{"role": "user", "content": "When does the library open?"}]
    served = engine.stream("prompt", question, temperature=0.0)
    served_text = served.text()
    # the same as the base model (adapter off) given the profiled conversation by hand
    by_hand = engine.stream("base", apply_profile(profile, question), temperature=0.0)
    assert (served_text, served.prompt_tokens) == (by_hand.text(), by_hand.prompt_tokens)
    assert served.prompt_tokens > engine.stream("base", question).prompt_tokens + 20  # the examples are in

    with pytest.raises(TailorError, match="the prompt profile name 'base' is taken by the base model"):
        Engine(tiny_model_dir, profiles={"base": profile})
