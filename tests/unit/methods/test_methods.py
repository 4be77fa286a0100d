"""Every registered method, on the tiny model: it trains, its artifact reloads to the same outputs, and an
interrupted run resumes to the same weights. Method-specific checks follow the common test."""

import json
import math

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tailor.config import validate_config
from tailor.errors import TailorError
from tailor.methods import p_tuning, registry
from tailor.methods.artifacts import load_for_inference, load_for_training, save_artifact
from tailor.methods.kinds import KINDS, get_kind
from tailor.methods.lora import LoraOptions, UsesLora, lora_config
from tailor.methods.lora import prepare as lora_prepare
from tailor.models.base import load_tokenizer
from tailor.train.examples import collate, tokenize_chat
from tailor.train.loop import train
from tailor.train.run import prepare_training, run_training, seed_everything, train_phases
from tailor.workspace import write_jsonl
from tests.unit.helpers import PROMPTS, REWARDS

FACTS = [("When is the library open?", "Monday to Friday, 9 am to 7 pm."),
         ("How much is a parking permit?", "A parking permit costs $45 per year."),
         ("What is city hall's phone number?", "Call (555) 201-4400.")]
# small settings so each method trains in about a second on the tiny model; every other option at its default
SMALL_OPTIONS = {"prompt_tuning": {"num_virtual_tokens": 4}, "prefix_tuning": {"num_virtual_tokens": 4},
                 "raft": {"lora": {"r": 4, "alpha": 8}},
                 "p_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 32}, "lora": {"r": 4, "alpha": 8},
                 # corpus methods: 4 steps on 32-token corpus blocks, then the chat records (8 steps)
                 "continued_pretraining": {"r": 4, "alpha": 8, "block_tokens": 32, "overlap_tokens": 8,
                                           "corpus_steps": 4, "then_sft": True},
                 "from_scratch": {"size": "tiny", "vocab_size": 512, "block_tokens": 32, "overlap_tokens": 8,
                                  "corpus_steps": 4},
                 # the teacher defaults to the base model; its greedy answers are cached once per run folder
                 "distill": {"r": 4, "alpha": 8, "max_new_tokens": 6}}
CORPUS = ["The Maplewood public library opens Monday to Friday from 9 am to 7 pm and on Saturdays from 10 am to "
          "4 pm. Library cards are free for residents and renew every three years at any branch desk.",
          "Residential parking permits cost $45 per year. Apply online or at City Hall, Room 104, with proof of "
          "address and the vehicle registration. Permits are valid in one zone only.",
          "City Hall is at 200 Main Street and is open weekdays from 8 am to 5 pm. Call (555) 201-4400 for the "
          "front desk or write to info@maplewood.gov."]
# high, for a visible drop in 8 steps on a random model; full moves every weight, so a smaller step
LEARNING_RATES = {"full": 2e-3, "lora": 1e-2, "raft": 1e-2,
                  "ia3": 1e-1, "continued_pretraining": 1e-2, "distill": 1e-2,
                  "from_scratch": 3e-3}


def chat(question, answer):
    # a short system message: without one the chat template inserts its long default
    return {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def config_for(model_dir, method, options=None, **train_options):
    train_options = {"method": method, "max_steps": 8, "batch_size": 3, "scheduler": "constant", "warmup_ratio": 0.0,
                     "learning_rate": LEARNING_RATES.get(method, 3e-2), "save_every": 0,
                     "dtype": "fp32"} | train_options
    options = SMALL_OPTIONS.get(method, {}) if options is None else options
    return validate_config({"base_model": model_dir, "train": train_options, "methods": {method: options}})


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def examples(tokenizer):
    # one record repeated: every batch is the same, so the loss curve shows learning rather than batch mix
    return [tokenize_chat(tokenizer, chat(*FACTS[0])["messages"]) for _ in range(12)]


def logits_of(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, -batch["input_ids"].shape[1]:]  # prompt-learning models prepend virtual positions


def trainable(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def train_fresh(config, examples, out_dir, tokenizer, **kwargs):
    seed_everything(config.train.seed)
    model = load_for_training(config, config.base_model, torch.float32)
    result = train(model, examples, [], config.train, out_dir, pad_id=tokenizer.pad_token_id, show_progress=False,
                   **kwargs)
    return model, result


# methods with their own data (preference pairs, rated answers, prompts to sample) train on the same core: their
# registry-wide test is test_methods_with_their_own_data_train_on_the_core_and_resume below
CORE = [name for name in registry.names() if registry.get(name).run is None]
OWN_DATA = [name for name in registry.names() if registry.get(name).run is not None]
TRAINED = [name for name in CORE if registry.get(name).trains]
BUILT = [name for name in CORE if not registry.get(name).trains]


@pytest.mark.parametrize("name", BUILT)
def test_methods_that_train_nothing_refuse_training_and_build_instead(name, tiny_model_dir):
    # no loss curve, checkpoint or weights: the model cannot even be prepared for training; the method builds
    # its artifact from the data instead (checked in test_prompt_method.py and the eval test below)
    with pytest.raises(TailorError, match=f"{name} trains no weights"):
        load_for_training(config_for(tiny_model_dir, name), tiny_model_dir, torch.float32)
    assert registry.get(name).build is not None


def write_run_data(run_dir, repeats=12):
    """One chat record repeated (every batch the same, so the loss curve shows learning rather than batch mix) and
    a three-document corpus."""
    write_jsonl(run_dir / "data" / "train.jsonl", [chat(*FACTS[0]) for _ in range(repeats)])
    write_jsonl(run_dir / "corpus.jsonl", [{"id": f"doc-{i}", "text": text, "source": f"doc-{i}.md"}
                                           for i, text in enumerate(CORPUS)])
    index_corpus(run_dir)
    return run_dir


def index_corpus(run_dir):
    """The retrieval index of RUN/corpus.jsonl that rag and raft answer from (`tailor index`)."""
    from tailor.retrieval.index import build_index

    build_index(run_dir / "corpus.jsonl", run_dir / "index", show_progress=False)


def train_run(config, run_dir, **kwargs):
    """The path `tailor train` takes (tokenizer, phases, model), returning the model still in memory."""
    prepared = prepare_training(config, run_dir, run_dir)
    result, finished = train_phases(prepared, config, run_dir, show_progress=False, **kwargs)
    return prepared, result, finished


def phase_losses(run_dir):
    """Loss per step of each phase, in order: earlier phases log under RUN/phases/<name>/, the last in RUN."""
    files = [run_dir / "phases" / name / "metrics.jsonl" for name in ("corpus",)
             if (run_dir / "phases" / name).is_dir()] + [run_dir / "metrics.jsonl"]
    return [[json.loads(line)["loss"] for line in path.read_text().splitlines()] for path in files]


@pytest.mark.parametrize("name", TRAINED)
def test_method_trains_reloads_and_resumes(name, tiny_model_dir, tokenizer, tmp_path):
    config = config_for(tiny_model_dir, name)
    straight_dir = write_run_data(tmp_path / "straight")
    prepared, result, finished = train_run(config, straight_dir)
    model = prepared.model
    losses = phase_losses(straight_dir)
    assert finished and result.steps == sum(len(phase) for phase in losses)
    assert len(losses[-1]) == 8 and all(math.isfinite(loss) for phase in losses for loss in phase)
    assert losses[-1][-1] < losses[-1][0] - 0.02, losses
    assert result.trainable_params > 0

    # save -> load through the helper `tailor eval` uses: the same logits as the model still in memory, on
    # examples encoded with the method's own tokenizer (from_scratch trains one)
    save_artifact(model, prepared.tokenizer, straight_dir, config)
    loaded = load_for_inference(config, straight_dir, tiny_model_dir, torch.float32, own_tokenizers=True)
    assert loaded.names == ["base", name]
    own_tokenizer = loaded.tokenizer_for(name, tokenizer)
    assert own_tokenizer.get_vocab() == prepared.tokenizer.get_vocab()
    batch = collate(prepared.phases[-1].train_examples[:3], prepared.tokenizer.pad_token_id, torch.device("cpu"))
    model.eval()
    trained_logits = logits_of(model, batch)
    with loaded.use(name) as tuned:
        torch.testing.assert_close(logits_of(tuned, batch), trained_logits, atol=1e-5, rtol=1e-5)
    # ... and "base" in the same comparison is the untouched base model
    base_batch = collate([tokenize_chat(tokenizer, chat(*FACTS[0])["messages"])], tokenizer.pad_token_id,
                         torch.device("cpu"))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with loaded.use("base") as base:
        torch.testing.assert_close(logits_of(base, base_batch), logits_of(plain, base_batch), atol=1e-5, rtol=1e-5)
    if own_tokenizer.get_vocab() == tokenizer.get_vocab():  # from_scratch alone reads other token ids
        with loaded.use(name) as tuned:
            assert not torch.allclose(logits_of(tuned, base_batch), logits_of(plain, base_batch), atol=1e-3)

    # interrupted half-way (a checkpoint of the trainable weights; for two-phase methods inside the second phase),
    # resumed to the end: the same weights
    resumed_dir = write_run_data(tmp_path / "resumed")
    halfway = result.steps // 2
    _, stopped, finished = train_run(config, resumed_dir, should_stop=lambda step: step == halfway)
    assert stopped.steps == halfway and not finished
    resumed, result, finished = train_run(config, resumed_dir, resume=True)
    assert finished and result.steps == sum(len(phase) for phase in losses)
    straight_weights, resumed_weights = trainable(model), trainable(resumed.model)
    assert straight_weights.keys() == resumed_weights.keys()
    for key, value in straight_weights.items():
        torch.testing.assert_close(resumed_weights[key], value, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_merged_into_the_base_gives_the_same_logits(use_dora, tiny_model_dir, tokenizer, examples):
    config = config_for(tiny_model_dir, "lora", {"r": 4, "alpha": 8, "use_dora": use_dora})
    torch.manual_seed(0)
    model = load_for_training(config, tiny_model_dir, torch.float32)
    with torch.no_grad():  # B starts at zero, which would make merging trivially exact
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    model.eval()
    batch = collate(examples[:3], tokenizer.pad_token_id, torch.device("cpu"))
    with_adapter = logits_of(model, batch)
    merged = model.merge_and_unload()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits_of(merged, batch), with_adapter, atol=1e-4, rtol=1e-4)


def test_p_tuning_keeps_one_prompt_table_row_per_task(tiny_model_dir, tokenizer, examples, tmp_path):
    options = {"num_virtual_tokens": 4, "encoder_type": "LSTM", "encoder_hidden_size": 16, "task_name": "hours"}
    config = config_for(tiny_model_dir, "p_tuning", options, max_steps=3)
    model, _ = train_fresh(config, examples, tmp_path / "hours", tokenizer)
    save_artifact(model, tokenizer, tmp_path, config)

    # the adapter is a plain prompt-tuning adapter: the computed embeddings, no encoder
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "PROMPT_TUNING"
    assert list(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == ["prompt_embeddings"]
    batch = collate(examples[:3], tokenizer.pad_token_id, torch.device("cpu"))
    model.eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    from_table = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits_of(from_table, batch), logits_of(model, batch), atol=1e-5, rtol=1e-5)

    rows, index = p_tuning.read_prompt_table(tmp_path)
    first_row = rows["hours"].clone()
    assert first_row.shape == (4, 64) and index["hours"]["num_virtual_tokens"] == 4
    assert index["hours"]["base_model"] == tiny_model_dir

    # a second task adds a row; the first is untouched, and the adapter now holds the second task
    config = config_for(tiny_model_dir, "p_tuning", options | {"task_name": "permits"}, max_steps=3, seed=7)
    model, _ = train_fresh(config, examples, tmp_path / "permits", tokenizer)
    save_artifact(model, tokenizer, tmp_path, config)
    rows, index = p_tuning.read_prompt_table(tmp_path)
    assert set(rows) == set(index) == {"hours", "permits"}
    assert torch.equal(rows["hours"], first_row)
    assert not torch.allclose(rows["permits"], first_row)
    assert torch.equal(load_file(tmp_path / "adapter" / "adapter_model.safetensors")["prompt_embeddings"],
                       rows["permits"])


def test_full_freezes_embeddings_and_first_layers(tiny_model_dir):
    model = load_for_training(config_for(tiny_model_dir, "full", {"freeze_layers": 1}), tiny_model_dir, torch.float32)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert "model.embed_tokens.weight" in frozen
    assert all(name.startswith(("model.embed_tokens", "model.layers.0.")) for name in frozen)
    assert any(name.startswith("model.layers.1.") and p.requires_grad for name, p in model.named_parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.fixture
def run_dir(tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", [chat(*FACTS[i % 3]) for i in range(6)])
    write_jsonl(tmp_path / "corpus.jsonl", [{"id": f"doc-{i}", "text": text} for i, text in enumerate(CORPUS)])
    return tmp_path


@pytest.mark.skipif(torch.cuda.is_available(), reason="QLoRA is available here")
def test_qlora_without_cuda_stops_with_one_clear_message(tiny_model_dir, run_dir):
    config = config_for(tiny_model_dir, "lora", {"quantize_4bit": True})
    with pytest.raises(TailorError, match=r"methods\.lora\.quantize_4bit: QLoRA needs a CUDA GPU and the "
                                          r"bitsandbytes package; here no CUDA GPU is visible"):
        run_training(config, run_dir, run_dir, show_progress=False)
    assert not (run_dir / "metrics.jsonl").exists()  # stopped before any training step


@pytest.mark.parametrize("method, options, message", [
    ("lora", {"targets": ["q_proj", "qkv"]}, r"methods\.lora\.targets: the model has no module named qkv \(it has"),
    ("ia3", {"targets": ["k_proj"], "feedforward": ["down_proj"]},
     r"methods\.ia3\.feedforward: down_proj must also be listed in methods\.ia3\.targets"),
    ("prompt_tuning", {"num_virtual_tokens": 1024},
     r"methods\.prompt_tuning\.num_virtual_tokens: 1024 virtual tokens do not fit the model's context of 1024"),
    ("full", {"freeze_layers": 3}, r"methods\.full\.freeze_layers: the model has 2 decoder layers \(found 3\)"),
])
def test_incompatible_options_stop_before_training(method, options, message, tiny_model_dir, run_dir):
    with pytest.raises(TailorError, match=message):
        run_training(config_for(tiny_model_dir, method, options), run_dir, run_dir, show_progress=False)
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.parametrize("method, options, message", [
    ("lora", {"r": 0}, r"methods\.lora\.r: Input should be greater than 0 \(found 0\)"),
    ("p_tuning", {"encoder_type": "GRU"}, r"methods\.p_tuning\.encoder_type: Input should be 'MLP' or 'LSTM'"),
    ("prefix_tuning", {"prefix": 3}, r"unknown key 'methods\.prefix_tuning\.prefix' \(allowed here: num_virtual"),
])
def test_invalid_options_are_named_in_the_config(method, options, message):
    with pytest.raises(TailorError, match=message):
        validate_config({"methods": {method: options}})



def test_every_method_leaves_a_known_artifact_kind():
    assert {registry.get(name).artifact for name in registry.names()} <= set(KINDS)


def test_every_module_of_the_methods_package_is_a_registered_method_or_a_named_helper():
    assert registry.method_modules() == set(registry.METHOD_MODULES)
    assert set(registry.names()) == set(registry.METHOD_MODULES)  # each registers the method of its own name
    assert not registry.HELPER_MODULES & set(registry.names())


@pytest.mark.parametrize("found, listed, message", [
    ({*registry.METHOD_MODULES, "orpo"}, registry.METHOD_MODULES,
     r"tailor\.methods\.orpo: a module of the methods package that is neither in METHOD_MODULES"),
    (set(registry.METHOD_MODULES) - {"ppo"}, registry.METHOD_MODULES,
     r"METHOD_MODULES lists 'ppo', but the methods package has no module of that name"),
    ({*registry.METHOD_MODULES, "alignment"}, (*registry.METHOD_MODULES, "alignment"),
     r"tailor\.methods\.alignment: registers no method named 'alignment'"),
])
def test_a_method_module_the_registry_does_not_know_stops_the_first_lookup(found, listed, message, monkeypatch):
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "method_modules", lambda: found)
    monkeypatch.setattr(registry, "METHOD_MODULES", listed)
    for _ in range(2):  # and every lookup after it: the registry is never used half-loaded
        with pytest.raises(TailorError, match=message):
            registry.names()


NESTING_LORA = [name for name in registry.names() if issubclass(registry.get(name).options, UsesLora)]


def test_methods_that_train_lora_nest_its_options():
    assert set(NESTING_LORA) == {"continued_pretraining", "distill", "dpo", "grpo", "kto", "ppo", "reward"}
    assert registry.get("raft").options.model_fields["lora"].annotation is LoraOptions


@pytest.mark.parametrize("name", NESTING_LORA)
def test_lora_shorthand_keys_mean_the_nested_ones(name):
    """`methods.<name>.r` (how these methods took LoRA options before they nested methods.lora's) still works."""
    flat = validate_config({"methods": {name: {"r": 4, "alpha": 8, "targets": ["q_proj"]}}}).method_options(name)
    nested = validate_config({"methods": {name: {"lora": {"r": 4, "alpha": 8, "targets": ["q_proj"]}}}})
    assert flat == nested.method_options(name)
    assert (flat.lora.r, flat.lora.alpha, flat.lora.targets) == (4, 8, ["q_proj"])
    with pytest.raises(TailorError, match=rf"methods\.{name}: .*'r' and 'lora\.r' are the same option"):
        validate_config({"methods": {name: {"r": 4, "lora": {"r": 8}}}})
    # these methods load their base in full precision: 4-bit is refused, not ignored
    with pytest.raises(TailorError, match=rf"methods\.{name}\.lora: .*quantize_4bit is for methods\.lora"):
        validate_config({"methods": {name: {"lora": {"quantize_4bit": True}}}})
    validate_config({"tune": {"space": {f"methods.{name}.{key}": {"type": "int", "low": 2, "high": 8}
                                        for key in ("r", "lora.alpha")}}})


def test_reward_keeps_its_smaller_lora_defaults_under_a_partial_override():
    options = validate_config({"methods": {"reward": {"lora": {"r": 4}}}}).method_options("reward")
    assert (options.lora.r, options.lora.alpha, options.lora.targets) == (4, 16, ["q_proj", "k_proj", "v_proj",
                                                                               "o_proj"])
    assert validate_config({}).method_options("dpo").lora == LoraOptions()


def test_one_lora_config_builder_carries_every_option(tiny_model_dir):
    options = LoraOptions(r=4, alpha=8, dropout=0.1, targets=["q_proj"], use_dora=True)
    config = lora_config(options)
    assert (config.r, config.lora_alpha, config.lora_dropout, set(config.target_modules), config.use_dora,
            config.task_type) == (4, 8, 0.1, {"q_proj"}, True, "CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(TailorError, match=r"methods\.dpo\.lora\.targets: the model has no module named qkv"):
        lora_prepare(model, LoraOptions(targets=["qkv"]), "methods.dpo.lora")


# from_scratch reads and writes with its own tokenizer: its evaluation is checked in test_new_methods.py
@pytest.mark.parametrize("name", [name for name in CORE if name != "from_scratch"])
def test_tailor_eval_compares_every_method_with_its_base(name, tiny_model_dir, run_dir):
    from tailor.evaluate.harness import run_eval

    write_jsonl(run_dir / "data" / "eval.jsonl", [chat(*fact) for fact in FACTS[:2]])
    config = validate_config({"base_model": tiny_model_dir, "methods": {name: SMALL_OPTIONS.get(name, {})},
                              "train": {"method": name, "max_steps": 2, "batch_size": 3, "dtype": "fp32",
                                        "learning_rate": LEARNING_RATES.get(name, 3e-2), "save_every": 0},
                              "eval": {"max_new_tokens": 3, "batch_size": 2}})
    if registry.get(name).artifact == "rag" or registry.get(name).grounded:  # they answer from the corpus index
        index_corpus(run_dir)
    run_training(config, run_dir, run_dir, show_progress=False)
    # like `tailor train --method NAME` then a plain `tailor eval`: tailor.yaml still names the default method
    eval_config = validate_config({"base_model": tiny_model_dir, "eval": {"max_new_tokens": 3, "batch_size": 2},
                                   "train": {"dtype": "fp32"}})
    report = run_eval(eval_config, run_dir, run_dir, show_progress=False)
    assert list(report["models"]) == ["base", name]
    assert report["models"]["base"]["eval_loss"] != report["models"][name]["eval_loss"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["train"]["method"] == name
    artifact = get_kind(registry.get(name).artifact).folder
    assert any(path.endswith(artifact) for path in manifest["stages"]["train"]["outputs"])


def own_data_run(name, model_dir, run_dir):
    """The data `name` trains on, written into run_dir, and a config of 4 steps (rollout methods: 4 iterations of
    one step each, so an interruption lands on an iteration's end)."""
    pairs = [{"prompt": [{"role": "user", "content": f"Who handles {topic}?"}],
              "chosen": f"Please contact the {topic.title()} Department, thank you.", "rejected": f"{topic}. no"}
             for topic in ("library", "parking", "pool", "permits", "taxes", "trash", "parks", "water")]
    write_jsonl(run_dir / "data" / "preferences.jsonl", pairs)
    write_jsonl(run_dir / "data" / "unpaired.jsonl",
                [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"} for p in pairs
                 for side in ("chosen", "rejected")])
    write_jsonl(run_dir / "data" / "train.jsonl",
                [{"messages": [*prompt, {"role": "assistant", "content": "Yes."}]} for prompt in PROMPTS])
    (run_dir / "test_rewards.py").write_text(REWARDS)
    options = {"reward": {"r": 4, "alpha": 8}, "dpo": {"r": 4, "alpha": 8}, "kto": {"r": 4, "alpha": 8},
               "ppo": {"r": 4, "alpha": 8, "reward_function": "test_rewards:says_yes", "iterations": 4,
                       "rollout_batch": 4, "mini_batch": 4, "ppo_epochs": 1, "max_new_tokens": 4},
               "grpo": {"r": 4, "alpha": 8, "graders": [{"type": "python", "function": "test_rewards:says_yes"},
                                                        {"type": "text_similarity", "weight": 0.5}],
                        "iterations": 4, "prompts_per_iteration": 2, "group_size": 2, "mini_batch": 4,
                        "max_new_tokens": 4}}[name]
    steps = {} if registry.get(name).train_keys == registry.ROLLOUT_TRAIN_KEYS else {"max_steps": 4, "batch_size": 4}
    return validate_config({"base_model": model_dir, "train": {
        "method": name, "learning_rate": 1e-2, "scheduler": "constant", "warmup_ratio": 0.0, "dtype": "fp32",
        "save_every": 0} | steps, "methods": {name: options}})


def artifact_weights(run_dir):
    folder = run_dir / ("reward" if (run_dir / "reward").is_dir() else "adapter")
    return {f"{path.name}:{key}": value for path in sorted(folder.glob("*.safetensors"))
            for key, value in load_file(path).items()}


@pytest.mark.parametrize("name", OWN_DATA)
def test_methods_with_their_own_data_train_on_the_core_and_resume(name, tiny_model_dir, tmp_path):
    config = own_data_run(name, tiny_model_dir, tmp_path / "straight")
    result = run_training(config, tmp_path / "straight", tmp_path / "straight", show_progress=False)
    lines = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == len(lines) == 4 and not result.interrupted
    assert all(math.isfinite(line["loss"]) and line["tokens_per_s"] > 0 and "lr" in line for line in lines)
    manifest = json.loads((tmp_path / "straight" / "manifest.json").read_text())
    assert manifest["stages"]["train"]["method"] == name
    straight = artifact_weights(tmp_path / "straight")
    assert straight

    # interrupted after step 2 (a checkpoint, no artifact), then resumed to the end: the same weights
    resumed_dir = tmp_path / "resumed"
    own_data_run(name, tiny_model_dir, resumed_dir)
    stopped = run_training(config, resumed_dir, resumed_dir, show_progress=False, should_stop=lambda step: step == 2)
    assert stopped.interrupted and stopped.steps == 2 and not artifact_weights(resumed_dir)
    resumed = run_training(config, resumed_dir, resumed_dir, resume=True, show_progress=False)
    assert resumed.steps == 4 and not resumed.interrupted
    weights = artifact_weights(resumed_dir)
    assert weights.keys() == straight.keys()
    for key, value in straight.items():
        torch.testing.assert_close(weights[key], value, atol=1e-6, rtol=1e-5)
    # another method's checkpoint is not resumed
    other = "dpo" if name != "dpo" else "kto"
    assert list((resumed_dir / "checkpoints").glob("step-2"))
    with pytest.raises(TailorError, match=f"--resume: .* was trained by method '{name}', not '{other}'"):
        run_training(own_data_run(other, tiny_model_dir, resumed_dir), resumed_dir, resumed_dir, resume=True,
                     show_progress=False)


@pytest.mark.parametrize("name, key", [("ppo", "max_steps"), ("grpo", "batch_size"), ("reward", "packing")])
def test_a_train_key_the_method_does_not_use_stops_the_run(name, key, tiny_model_dir, tmp_path):
    config = own_data_run(name, tiny_model_dir, tmp_path)
    value = {"max_steps": 7, "batch_size": 3, "packing": True}[key]
    config = config.model_copy(update={"train": config.train.model_copy(update={key: value})})
    with pytest.raises(TailorError, match=rf"train\.{key}: method '{name}' does not use it \(it uses train\."):
        run_training(config, tmp_path, tmp_path, show_progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()
