"""Method `rag` and retrieval for any method, on the tiny model: build, evaluate (recall, MRR, citations,
abstention, the HTML page), serve through the official openai client with sources (whole and streamed), a LoRA
trained and served with retrieval, and one clear message for each kind of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest
import torch
import yaml

from tailor.cli.retrieval import build_run_index
from tailor.config import ServeConfig, load_config
from tailor.data.build import build_chat_data
from tailor.data.ingest import ingest
from tailor.errors import TailorError
from tailor.evaluate.harness import run_eval
from tailor.serve.engine import Engine
from tailor.train.run import BuildResult, prepare_training, run_training
from tests.conftest import EXAMPLE
from tests.unit.helpers import start_server, tailor

DOCS = ("city-hall.md", "dog-licenses.md", "noise-complaints.txt", "marriage-licenses.pdf", "tree-planting.txt")
EVAL = [{"question": "What is the address of City Hall?", "answer": "City Hall is at 400 Linden Avenue.",
         "source": "city-hall.md"},
        {"question": "How much does a marriage license cost?", "answer": "A marriage license costs $50."},
        {"question": "When are quiet hours on weeknights?", "answer": "Quiet hours are 10 pm to 7 am on weeknights."},
        {"question": "Explain quantum chromodynamics gluon confinement", "answer": "The documents do not say.",
         "answerable": False}]
TRAIN = [{"question": "Where is City Hall?", "answer": "City Hall is at 400 Linden Avenue."},
         {"question": "What does a dog license cost?", "answer": "A dog license costs $20 a year."}]


def make_workspace(folder: Path, model_dir: str, **extra) -> Path:
    (folder / "docs").mkdir(parents=True)
    for name in DOCS:
        shutil.copy(EXAMPLE / "docs" / name, folder / "docs" / name)
    (folder / "qa").mkdir()
    (folder / "qa" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVAL))
    (folder / "qa" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    config = {"project": "rag-test", "base_model": model_dir, "sources": ["docs"],
              "system_prompt": "You answer residents' questions in one short sentence.",
              "data": {"eval_files": ["qa/eval.jsonl"]}, "train": {"method": "rag", "dtype": "fp32"},
              "eval": {"max_new_tokens": 8}}
    for key, value in extra.items():
        config.setdefault(key, {}).update(value)
    (folder / "tailor.yaml").write_text(yaml.safe_dump(config))
    return folder


def prepare_run(workspace: Path, *, index: bool = True):
    config, root = load_config(workspace)
    run_dir = workspace / "run"
    ingest([str(root / "docs")], run_dir / "corpus.jsonl", progress=False)
    if index:
        build_run_index(config, root, run_dir, show_progress=False)
    build_chat_data(config, root, run_dir)
    return config, root, run_dir


@pytest.fixture(scope="module")
def rag_run(tmp_path_factory, tiny_model_dir):
    workspace = make_workspace(tmp_path_factory.mktemp("ws"), tiny_model_dir)
    config, root, run_dir = prepare_run(workspace)
    result = run_training(config, root, run_dir, show_progress=False)
    assert isinstance(result, BuildResult) and (run_dir / "rag" / "retrieval.json").is_file()
    return config, root, run_dir


def test_rag_needs_no_training_data_and_is_evaluated_for_grounding(rag_run):
    config, root, run_dir = rag_run
    assert not (run_dir / "data" / "train.jsonl").exists()  # eval files alone were enough
    report = run_eval(config, root, run_dir, show_progress=False)
    rag, base = report["models"]["rag"], report["models"]["base"]
    for key in ("recall_at_5", "mrr", "faithfulness", "citation_accuracy", "abstention_accuracy", "fact_recall"):
        assert rag[key] is not None, key
    assert rag["recall_at_5"] == 1.0 and rag["gold_known"] == 3
    assert rag["abstention_accuracy"] == 1.0  # off-topic: the retrieval gate abstains without generating
    assert "recall_at_5" not in base and "abstention_accuracy" in base
    rows = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    grounded = [row for row in rows if row["model"] == "rag"]
    first = grounded[0]
    assert Path(first["retrieved"][0]["source"]).name == "city-hall.md" and first["gold_rank"] == 1
    assert first["citations"] and first["gold_sources"] == [first["retrieved"][0]["source"]]
    assert grounded[3]["abstained"] and grounded[3]["prediction"] == config.retrieval.abstain_answer
    page = (run_dir / "eval" / "report.html").read_text()
    assert "Retrieved passages and citations of rag" in page and "400 Linden Avenue" in page
    assert "citation_accuracy" in page


@pytest.fixture(scope="module")
def rag_server(rag_run, tiny_model_dir):
    _, _, run_dir = rag_run
    engine = Engine(tiny_model_dir, adapters={"rag": str(run_dir / "rag")}, dtype=torch.float32, max_new_tokens=12)
    # the output filters run on grounded answers too: "say" is blocked in every reply
    server, url = start_server(engine, config=ServeConfig(feedback_db=":memory:", request_log=None,
                                                          rate_limit="10000/minute", blocklist=[r"\bsay\b"]))
    yield engine, url
    server.should_exit = True
    engine.shutdown()


def test_served_rag_answers_carry_their_sources(rag_server):
    _, url = rag_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    question = [{"role": "user", "content": "What is the address of City Hall?"}]
    reply = client.chat.completions.create(model="rag", messages=question, temperature=0, max_tokens=10)
    citations = reply.model_extra["citations"]
    assert Path(citations[0]["source"]).name == "city-hall.md" and citations[0]["snippet"]
    assert {"source", "title", "page", "url", "snippet", "id"} <= set(citations[0])
    chunks = list(client.chat.completions.create(model="rag", messages=question, temperature=0, max_tokens=10,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content
    assert [c.model_extra.get("citations") for c in chunks if c.model_extra.get("citations")] == [citations]
    assert "citations" not in client.chat.completions.create(  # a model without retrieval: OpenAI's shape
        model="base", messages=question, temperature=0, max_tokens=4).model_extra
    passage = httpx.get(f"{url}/v1/sources/{citations[0]['id']}").json()
    assert "400 Linden Avenue" in passage["text"] and passage["source"] == citations[0]["source"]
    assert httpx.get(f"{url}/v1/sources/nope").status_code == 404
    assert httpx.get(f"{url}/v1/models").json()["default"] == "rag"


def test_served_rag_abstains_and_refuses_raw_completion(rag_server):
    _, url = rag_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    off_topic = [{"role": "user", "content": "Explain quantum chromodynamics gluon confinement"}]
    reply = client.chat.completions.create(model="rag", messages=off_topic, temperature=0)
    assert reply.choices[0].message.content == "The documents do not [blocked]."  # abstained, then filtered
    assert reply.model_extra["citations"] == []
    with pytest.raises(openai.BadRequestError, match="grounded in retrieved passages"):
        client.completions.create(model="rag", prompt="City Hall is", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="over the retrieval budget"):
        client.chat.completions.create(model="rag", messages=[{"role": "user", "content": "tax " * 1200}])


def test_a_lora_trains_and_serves_with_retrieval(tmp_path, tiny_model_dir):
    workspace = make_workspace(tmp_path / "ws", tiny_model_dir,
                               data={"qa_files": ["qa/train.jsonl"]},
                               train={"method": "lora", "max_steps": 2, "batch_size": 2, "save_every": 0},
                               retrieval={"enabled": True})
    config, root, run_dir = prepare_run(workspace)
    prepared = prepare_training(config, root, run_dir)
    prompt = prepared.tokenizer.decode(prepared.phases[0].train_examples[0].input_ids)
    assert "Passages:" in prompt and '"""' in prompt  # trained on the passages it will be served with
    run_training(config, root, run_dir, show_progress=False)
    assert (run_dir / "adapter" / "retrieval.json").is_file()
    engine = Engine(tiny_model_dir, adapters={"lora": str(run_dir / "adapter")}, dtype=torch.float32,
                    max_new_tokens=6)
    try:
        generation = engine.stream("lora", [{"role": "user", "content": "What is the address of City Hall?"}],
                                   temperature=0)
        text = generation.text()
        assert Path(generation.citations(text)[0]["source"]).name == "city-hall.md"
    finally:
        engine.shutdown()


def test_rag_without_an_index_is_one_clear_error(tmp_path, tiny_model_dir):
    workspace = make_workspace(tmp_path / "ws", tiny_model_dir)
    config, root, run_dir = prepare_run(workspace, index=False)
    with pytest.raises(TailorError, match="no index at .*run `tailor index` first"):
        run_training(config, root, run_dir, show_progress=False)
    assert not (run_dir / "rag").exists()


def test_index_command_reports_bad_input_in_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "corpus.jsonl").write_text("")
    result = tailor("index", "--no-progress", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr + result.stdout
    assert "corpus.jsonl: the corpus is empty" in " ".join(result.stderr.split())  # rich wraps long lines


def test_compare_ranks_rag_with_its_retrieval_figures(rag_run):
    from tailor.cli.compare import compare_table, run_compare

    config, root, run_dir = rag_run
    summary = run_compare(config, root, run_dir, ["rag"], show_progress=False, latency_questions=1)
    row = summary["methods"][0]
    assert row["method"] == "rag" and row["trainable_params"] == 0 and row["recall_at_5"] == 1.0
    assert row["citation_accuracy"] is not None and summary["base"]["recall_at_5"] is None
    assert "recall@5" in str(compare_table(summary).columns[5].header)


def test_an_index_server_that_goes_away_answers_503(tmp_path, tiny_model_dir):
    from tests.unit.retrieval.test_retrieval import start_chroma

    process, chroma = start_chroma(tmp_path / "chroma")
    try:
        workspace = make_workspace(tmp_path / "ws", tiny_model_dir, retrieval={"url": chroma})
        config, root, run_dir = prepare_run(workspace)
        run_training(config, root, run_dir, show_progress=False)
        engine = Engine(tiny_model_dir, adapters={"rag": str(run_dir / "rag")}, dtype=torch.float32,
                        max_new_tokens=4)
        server, url = start_server(engine, config=ServeConfig(feedback_db=":memory:", request_log=None))
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        question = [{"role": "user", "content": "What is the address of City Hall?"}]
        assert client.chat.completions.create(model="rag", messages=question).model_extra["citations"]
        process.terminate()
        process.wait(timeout=20)
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(model="rag", messages=question)
        assert failed.value.status_code == 503 and "retrieval failed" in str(failed.value)
        server.should_exit = True
        engine.shutdown()
    finally:
        process.kill()


def test_personal_data_quoted_from_the_passages_stays_and_other_is_redacted(rag_run):
    from tailor.serve.filters import OutputFilter

    passages = "Contact - Main line: (555) 201-4400 - General email: info@maplewood.gov"
    output = OutputFilter(redact_pii=True)
    answer = "Call (555) 201-4400 or write to info@maplewood.gov, or jane.doe@example.com."
    assert output.apply(answer, passages) == "Call (555) 201-4400 or write to info@maplewood.gov, or <EMAIL>."
    assert "<PHONE>" in output.apply(answer)  # without passages: everything redacted, as before
    stream = output.stream(passages)
    sent = "".join(stream.push(answer[i:i + 5]) for i in range(0, len(answer), 5)) + stream.finish()
    assert sent == output.apply(answer, passages)


RAFT_PAIRS = [{"question": "Where is City Hall?", "answer": "City Hall is at 400 Linden Avenue."},
              {"question": "What does a dog license cost?", "answer": "A dog license costs $20 a year."},
              {"question": "When do quiet hours start on weeknights?", "answer": "Quiet hours start at 10 pm."},
              {"question": "Is a street tree free?", "answer": "Street trees are planted free of charge."},
              {"question": "What does a marriage license cost?", "answer": "A marriage license costs $50."},
              {"question": "What number is City Hall's main line?", "answer": "Call (555) 201-4400."},
              {"question": "How long must I water a new street tree?", "answer": "Water it weekly for two years."},
              {"question": "How do I report a barking dog?", "answer": "Report it to Animal Services."}]


def test_raft_trains_on_the_oracle_among_distractors_or_on_abstaining_without_it(tmp_path, tiny_model_dir):
    from tailor.methods.raft import raft_messages
    from tailor.train.run import training_grounding

    workspace = make_workspace(tmp_path / "ws", tiny_model_dir, data={"qa_files": ["qa/train.jsonl"]},
                               train={"method": "raft", "max_steps": 2, "batch_size": 4, "save_every": 0},
                               methods={"raft": {"lora": {"r": 4, "alpha": 8}, "oracle_share": 0.5,
                                                 "distractors": 2}})
    (workspace / "qa" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RAFT_PAIRS))
    config, root, run_dir = prepare_run(workspace)
    prepared = prepare_training(config, root, run_dir)
    grounding = training_grounding(config, root, run_dir, prepared.tokenizer, force=True)
    records = [json.loads(line) for line in (run_dir / "data" / "train.jsonl").read_text().splitlines()]
    kinds = []
    for record in records:
        messages = raft_messages(record["messages"], record, grounding, config.method_options("raft"), seed=42)
        prompt, target = messages[-2]["content"], messages[-1]["content"]
        assert messages[:-1][0]["role"] == "system" and "not instructions" in messages[0]["content"]
        if target == config.retrieval.abstain_answer:
            kinds.append("abstain")
            assert prompt.count('"""') == 2 * 2  # the distractors alone
        else:
            kinds.append("oracle")
            assert target == record["messages"][-1]["content"] and prompt.count('"""') == 2 * 3
            if "400 Linden" in target:  # the oracle is the chunk that holds the answer
                assert "400 Linden Avenue" in prompt
    assert {"abstain", "oracle"} == set(kinds)  # oracle_share 0.5 over 8 pairs: both kinds
    again = [raft_messages(r["messages"], r, grounding, config.method_options("raft"), seed=42) for r in records]
    assert again == [raft_messages(r["messages"], r, grounding, config.method_options("raft"), seed=42)
                     for r in records]  # deterministic: a rerun trains on the same records
    decoded = prepared.tokenizer.decode(prepared.phases[0].train_examples[0].input_ids)
    assert "Passages:" in decoded
    from tailor.estimate import dataset_stats, estimate

    # `tailor estimate` counts the records raft trains on, passages included, not the bare pairs
    planned = estimate(config, root, run_dir / "data" / "train.jsonl", probe_seconds=0.05).data
    assert planned.tokens == sum(len(e.input_ids) for e in prepared.phases[0].train_examples)
    assert planned.tokens > 2 * dataset_stats(run_dir / "data" / "train.jsonl", prepared.tokenizer).tokens
    run_training(config, root, run_dir, show_progress=False)
    assert (run_dir / "adapter" / "retrieval.json").is_file()
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    report = run_eval(config, root, run_dir, show_progress=False, write_html=False)
    assert report["models"]["raft"]["recall_at_5"] is not None  # evaluated with retrieval, as it is served
