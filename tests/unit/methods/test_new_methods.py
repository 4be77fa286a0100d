"""continued_pretraining, from_scratch and distill beyond the common registry test (test_methods.py): corpus
blocks, the trained tokenizer, the teacher's vocabulary and answers, and the errors raised before training."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tailor.config import validate_config
from tailor.data.pretrain import block_examples, build_pretrain_blocks, documents_from_corpus
from tailor.errors import TailorError
from tailor.evaluate.generate import greedy_answers
from tailor.methods import distill, from_scratch
from tailor.methods.artifacts import load_for_inference
from tailor.models.base import load_tokenizer
from tailor.train.examples import IGNORE, collate
from tailor.train.run import prepare_training, run_training, train_phases
from tailor.workspace import write_jsonl
from tests.unit.helpers import FACTS, chat

CORPUS = ["The Maplewood public library opens Monday to Friday from 9 am to 7 pm and on Saturdays from 10 am to 4 pm. "
          "Library cards are free for residents and renew every three years at any branch desk.",
          "Residential parking permits cost $45 per year. Apply online or at City Hall, Room 104, with proof of "
          "address and the vehicle registration. Permits are valid in one zone only.",
          "City Hall is at 200 Main Street and is open weekdays from 8 am to 5 pm. Call (555) 201-4400 for the "
          "front desk or write to info@maplewood.gov."]
TRAIN = {"max_steps": 4, "batch_size": 3, "scheduler": "constant", "warmup_ratio": 0.0, "learning_rate": 1e-2,
         "save_every": 0, "dtype": "fp32"}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture
def run_dir(tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", [chat(*FACTS[i % 3]) for i in range(6)])
    write_jsonl(tmp_path / "data" / "eval.jsonl", [chat(*fact) for fact in FACTS[:2]])
    write_jsonl(tmp_path / "corpus.jsonl", [{"id": f"doc-{i}", "text": text} for i, text in enumerate(CORPUS)])
    return tmp_path


def config(model_dir, method, options, **train):
    return validate_config({"base_model": model_dir, "train": {"method": method, **TRAIN, **train},
                            "methods": {method: options}, "eval": {"max_new_tokens": 4, "batch_size": 4}})


def test_chunks_join_back_into_documents_without_their_overlap(tmp_path):
    text = "One two three four five six seven eight nine ten."
    write_jsonl(tmp_path / "c.jsonl", [{"text": text[0:24], "source": "a.md", "char_start": 0, "char_end": 24},
                                       {"text": text[14:], "source": "a.md", "char_start": 14,
                                        "char_end": len(text), "chunk": 1},
                                       {"text": "Another document.", "source": "b.md"}])
    assert [text for _, text in documents_from_corpus(tmp_path / "c.jsonl")] == [text, "Another document."]


def test_blocks_overlap_as_context_and_teach_every_token_once(tokenizer, tmp_path):
    text = " ".join(CORPUS)
    write_jsonl(tmp_path / "corpus.jsonl", [{"text": text, "source": "handbook.md"}])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    train, held_out = build_pretrain_blocks(tmp_path / "corpus.jsonl", tokenizer, block_tokens=32, overlap_tokens=8,
                                            eval_fraction=0.0, seed=0)
    blocks = block_examples(train, tokenizer)
    assert not held_out and len(blocks) > 2 and all(len(block.input_ids) <= 33 for block in blocks)
    # block k starts 24 tokens after block k-1; its first 8 tokens are context only
    assert [b["context_tokens"] for b in train] == [0] + [8] * (len(train) - 1)
    assert blocks[1].input_ids[:8] == blocks[0].input_ids[24:32]
    assert blocks[1].labels[:8] == [IGNORE] * 8 and blocks[1].labels[8:] == blocks[1].input_ids[8:]
    # every token but the very first is predicted exactly once over all blocks (re-tokenizing a block's text may
    # merge a token at its edge differently: within one token per block)
    taught = sum(label != IGNORE for block in blocks for label in block.labels[1:])
    assert abs(taught - (len(ids) - 1)) <= len(blocks)
    assert blocks[-1].input_ids[-1] == tokenizer.eos_token_id and blocks[0].input_ids[-1] != tokenizer.eos_token_id


def test_held_out_documents_are_deterministic_and_apart(tokenizer, run_dir):
    records = [{"id": f"chunk-{i}", "text": f"Chunk number {i} of the city handbook."} for i in range(40)]
    write_jsonl(run_dir / "corpus.jsonl", records)
    options = {"block_tokens": 64, "overlap_tokens": 0, "eval_fraction": 0.25, "seed": 3}
    first = build_pretrain_blocks(run_dir / "corpus.jsonl", tokenizer, **options)
    again = build_pretrain_blocks(run_dir / "corpus.jsonl", tokenizer, **options)
    assert first == again and first[1]
    train_text = {block["text"] for block in first[0]}
    assert not any(block["text"] in train_text for block in first[1])
    assert {block["source"] for block in first[0]}.isdisjoint({block["source"] for block in first[1]})


def test_continued_pretraining_reads_the_blocks_data_build_wrote(tiny_model_dir, run_dir, tokenizer):
    blocks = [{"text": text, "source": f"doc-{i}", "context_tokens": 0, "last": True} for i, text in enumerate(CORPUS)]
    write_jsonl(run_dir / "data" / "pretrain" / "train.jsonl", blocks[:2])
    write_jsonl(run_dir / "data" / "pretrain" / "eval.jsonl", blocks[2:])
    prepared = prepare_training(config(tiny_model_dir, "continued_pretraining", {}), run_dir, run_dir)
    corpus = prepared.phases[0]
    assert [tokenizer.decode(e.input_ids[:-1]) for e in corpus.train_examples] == CORPUS[:2]
    assert [tokenizer.decode(e.input_ids[:-1]) for e in corpus.eval_examples] == CORPUS[2:]


@pytest.mark.parametrize("method, options, message", [
    ("continued_pretraining", {"block_tokens": 2048},
     r"methods\.continued_pretraining\.block_tokens: 2048 tokens do not fit the model's context of 1024"),
    ("continued_pretraining", {"block_tokens": 64, "overlap_tokens": 64},
     r"methods\.continued_pretraining\.overlap_tokens: must be below block_tokens=64"),
    ("continued_pretraining", {"weights": "lora", "targets": ["qkv"]},
     r"methods\.continued_pretraining\.lora\.targets: the model has no module named qkv"),
    ("from_scratch", {"size": "tiny", "vocab_size": 512, "context": 20, "block_tokens": 16, "overlap_tokens": 4},
     r"methods\.from_scratch\.context: a chat record of \d+ tokens \(with this tokenizer\) does not fit"),
    ("distill", {"targets": ["qkv"], "kl_weight": 0},
     r"methods\.distill\.lora\.targets: the model has no module named qkv"),
])
def test_incompatible_options_stop_before_training(method, options, message, tiny_model_dir, run_dir):
    with pytest.raises(TailorError, match=message):
        run_training(config(tiny_model_dir, method, options), run_dir, run_dir, show_progress=False)
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "model").exists()


@pytest.mark.parametrize("method", ["continued_pretraining", "from_scratch"])
def test_a_missing_corpus_is_named_before_any_model_loads(method, tiny_model_dir, run_dir):
    (run_dir / "corpus.jsonl").unlink()
    with pytest.raises(TailorError, match=r"corpus\.jsonl: not found; run `tailor ingest` first"):
        run_training(config(tiny_model_dir, method, {}), run_dir, run_dir, show_progress=False)


@pytest.mark.parametrize("options, message", [
    ({"r": 0}, r"methods\.distill\.lora\.r: Input should be greater than 0"),  # r is short for lora.r
    ({"temperature": 0}, r"methods\.distill\.temperature: Input should be greater than 0"),
    ({"kl_weight": 0, "answers": "reference"}, r"methods\.distill: .*learns nothing from the teacher"),
])
def test_invalid_distill_options_are_named_in_the_config(options, message):
    with pytest.raises(TailorError, match=message):
        validate_config({"methods": {"distill": options}})


def test_from_scratch_tokenizer_keeps_special_tokens_and_chat_template(tiny_model_dir, tokenizer, run_dir):
    prepared = prepare_training(config(tiny_model_dir, "from_scratch", {"size": "tiny", "vocab_size": 600}),
                                run_dir, run_dir)
    trained = prepared.tokenizer
    assert 300 < len(trained) <= 600 and trained.get_vocab() != tokenizer.get_vocab()
    # the base's special tokens come first, in the same order: the chat format's markers keep their ids
    specials = from_scratch.special_tokens(tokenizer)
    assert [trained.convert_tokens_to_ids(token) for token in specials] == list(range(len(specials)))
    assert trained.eos_token == tokenizer.eos_token and trained.chat_template == tokenizer.chat_template
    ids = trained.apply_chat_template(chat(*FACTS[0])["messages"], tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids.count(trained.convert_tokens_to_ids("<|im_start|>")) == 3
    assert trained.decode(trained("Parking permits cost $45.")["input_ids"]) == "Parking permits cost $45."
    # the model: random, the preset's shape, the tokenizer's special ids, every weight training
    model = prepared.model
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.config.vocab_size == 600 and model.config.eos_token_id == trained.eos_token_id
    assert all(p.requires_grad for p in model.parameters())
    # trained once: a second run on the same texts reuses RUN/tokenizer
    stamp = run_dir / "tokenizer" / "trained_on.sha256"
    before = stamp.stat().st_mtime_ns
    again = prepare_training(config(tiny_model_dir, "from_scratch", {"size": "tiny", "vocab_size": 600}),
                             run_dir, run_dir)
    assert again.tokenizer.get_vocab() == trained.get_vocab() and stamp.stat().st_mtime_ns == before


def test_from_scratch_model_answers_with_its_own_tokenizer(tiny_model_dir, tokenizer, run_dir):
    settings = config(tiny_model_dir, "from_scratch", {"size": "tiny", "vocab_size": 512, "block_tokens": 32,
                                                       "overlap_tokens": 8, "corpus_steps": 2}, max_steps=2)
    run_training(settings, run_dir, run_dir, show_progress=False)
    assert (run_dir / "model" / "tokenizer.json").is_file()
    # a caller that reads every model with the base's tokens is stopped with one message, not fed wrong ids
    with pytest.raises(TailorError, match=r"this from_scratch model has its own tokenizer \(\d+ tokens"):
        load_for_inference(settings, run_dir, tiny_model_dir, torch.float32)
    models = load_for_inference(settings, run_dir, tiny_model_dir, torch.float32, own_tokenizers=True)
    own = models.tokenizer_for("from_scratch", tokenizer)
    assert len(own) <= 512 and models.tokenizer_for("base", tokenizer) is tokenizer
    conversation = [chat(*FACTS[0])["messages"][:-1]]
    with models.use("from_scratch") as model:
        answers = greedy_answers(model, own, conversation, max_new_tokens=4, batch_size=1)
    assert isinstance(answers[0], str)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [phase["phase"] for phase in manifest["stages"]["train"]["phases"]] == ["corpus", "sft"]


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir, tokenizer, tmp_path_factory):
    """Another tiny model with the same tokenizer: a teacher whose distributions differ from the student's."""
    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for param in model.parameters():
        param.data.normal_(std=0.1)
    model.get_input_embeddings().weight.data.normal_(std=1.0)  # tied to the output: peaked distributions
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def mean_kl(student, teacher, batch):
    with torch.no_grad():
        mask = batch["labels"][:, 1:] != IGNORE
        s = distill.answer_logits(student, batch, mask).log_softmax(-1)
        t = distill.answer_logits(teacher, batch, mask).log_softmax(-1)
    return float(torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean"))


def test_distill_moves_the_student_towards_the_teacher(tiny_model_dir, teacher_dir, run_dir):
    # a student trained in full: the teacher's peaked distributions need a larger output scale than LoRA reaches
    # in 8 steps (the LoRA student is trained in the common test)
    settings = config(tiny_model_dir, "distill", {"teacher": teacher_dir, "student": tiny_model_dir, "kl_weight": 1.0,
                                                  "temperature": 1.0, "answers": "reference"}, max_steps=8,
                      learning_rate=3e-3)
    prepared = prepare_training(settings, run_dir, run_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    batch = collate(prepared.phases[0].train_examples[:3], prepared.tokenizer.pad_token_id, torch.device("cpu"))
    before = mean_kl(prepared.model, teacher, batch)
    result, finished = train_phases(prepared, settings, run_dir, show_progress=False)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert finished and losses[-1] < losses[0]
    assert mean_kl(prepared.model, teacher, batch) < 0.8 * before


def test_distill_trains_on_the_teacher_answers_generated_once(tiny_model_dir, teacher_dir, run_dir):
    settings = config(tiny_model_dir, "distill", {"teacher": teacher_dir, "kl_weight": 0, "max_new_tokens": 5})
    prepared = prepare_training(settings, run_dir, run_dir)
    cache = run_dir / "distill" / "teacher_answers.jsonl"
    cached = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(cached) == 6 and all(record["answer"] for record in cached)
    student_tokenizer = prepared.tokenizer
    first = prepared.phases[0].train_examples[0]
    answer_ids = [label for label in first.labels if label != IGNORE]
    assert student_tokenizer.decode(answer_ids, skip_special_tokens=True).strip() == cached[0]["answer"]
    # the cache answers the next run: an edited answer shows up instead of a regenerated one
    write_jsonl(cache, [record | {"answer": "Edited answer."} if record["key"] == cached[0]["key"] else record
                        for record in cached])  # the same question twice in the data: one key
    again = prepare_training(settings, run_dir, run_dir)
    labels = [label for label in again.phases[0].train_examples[0].labels if label != IGNORE]
    assert student_tokenizer.decode(labels, skip_special_tokens=True).strip() == "Edited answer."


def test_distill_refuses_a_teacher_with_another_vocabulary(tiny_model_dir, run_dir, tmp_path):
    # a teacher with a tokenizer trained on the corpus (from_scratch's) shares no vocabulary with the student
    other = prepare_training(config(tiny_model_dir, "from_scratch", {"size": "tiny", "vocab_size": 512}), run_dir,
                             run_dir)
    teacher = tmp_path / "other-teacher"
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(teacher)
    other.tokenizer.save_pretrained(teacher)
    with pytest.raises(TailorError, match=r"methods\.distill\.teacher: the teacher \(.*\) and the student "
                                          r"\(49152 tokens\) do not share one vocabulary"):
        run_training(config(tiny_model_dir, "distill", {"teacher": str(teacher)}), run_dir, run_dir,
                     show_progress=False)
    assert not (run_dir / "metrics.jsonl").exists()


def test_distill_teacher_from_a_trained_run_and_a_named_student(tiny_model_dir, teacher_dir, run_dir, tmp_path):
    # the teacher: a LoRA run folder, loaded as adapter-on-base and merged; the student: a model folder, in full
    teacher_run = tmp_path / "teacher-run"
    write_jsonl(teacher_run / "data" / "train.jsonl", [chat(*fact) for fact in FACTS])
    lora = config(tiny_model_dir, "lora", {"r": 4, "alpha": 8}, max_steps=2)
    run_training(lora, teacher_run, teacher_run, show_progress=False)
    teacher, _, name = distill.load_teacher(str(teacher_run), tmp_path, torch.float32)
    assert name.endswith("adapter") and not hasattr(teacher, "peft_config")
    reference = load_for_inference(lora, teacher_run, tiny_model_dir, torch.float32)
    batch = collate(prepare_training(lora, teacher_run, teacher_run).phases[0].train_examples[:2], 2,
                    torch.device("cpu"))
    with reference.use("lora") as adapted, torch.no_grad():
        torch.testing.assert_close(teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                                   adapted(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                                   atol=1e-5, rtol=1e-5)
    settings = config(tiny_model_dir, "distill", {"teacher": str(teacher_run), "student": teacher_dir,
                                                  "answers": "reference"}, max_steps=2)
    result = run_training(settings, run_dir, run_dir, show_progress=False)
    assert result.trainable_params == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(
        teacher_dir).parameters())
    assert (run_dir / "model" / "config.json").is_file()
    saved = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert not torch.equal(saved.model.layers[0].mlp.up_proj.weight,
                           AutoModelForCausalLM.from_pretrained(teacher_dir).model.layers[0].mlp.up_proj.weight)
