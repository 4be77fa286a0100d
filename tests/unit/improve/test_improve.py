"""`tailor improve` on the tiny model, against a real server (uvicorn in a thread, real HTTP), a real feedback
database and a real registry: conversations with thumbs and corrections → review → improve → canary served beside
production under the same name → A/B significant → promoted; a candidate trained with a huge learning rate is refused
by the gates; a candidate whose users vote it down is rolled back by the monitor rule; a second run while one holds
the lock changes nothing; bad input is one line."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import httpx
import pytest
import torch
import uvicorn
import yaml

from tailor.config import ServeConfig, load_config
from tailor.errors import TailorError
from tailor.improve.pipeline import improve_folder, lock_path, run_improve
from tailor.improve.state import LockedError, hold_lock
from tailor.registry import open_registry
from tailor.serve.app import bind_socket, create_app
from tailor.serve.engine import Engine
from tailor.serve.feedback import FeedbackStore
from tailor.serve.registry_watch import RegistryWatcher
from tailor.workspace import read_jsonl, update_manifest, write_jsonl

SYSTEM = "You answer residents' questions in one short sentence."
FACTS = [("Where is City Hall?", "City Hall is at 400 Linden Avenue."),
         ("When is the library open?", "The library is open 9 am to 8 pm."),
         ("How much is a parking permit?", "A parking permit costs 40 dollars a year."),
         ("When is trash collected?", "Trash is collected on Tuesdays."),
         ("How do I report a pothole?", "Report potholes on the city website."),
         ("Where is the pool?", "The pool is in Riverside Park."),
         ("When does the pool open?", "The pool opens on June 1."),
         ("How much is a dog license?", "A dog license costs 15 dollars.")]


def chat(question, answer=None):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return {"messages": messages + ([{"role": "assistant", "content": answer}] if answer else [])}


def production_run(folder, model_dir):
    """A run folder as `tailor train` leaves it, with a fresh LoRA adapter (answers as the base does)."""
    import peft
    from transformers import AutoModelForCausalLM

    from tailor.config import validate_config

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(folder / "adapter")
    write_jsonl(folder / "data" / "train.jsonl", [chat(q, a) for q, a in FACTS])
    write_jsonl(folder / "data" / "eval.jsonl", [chat(q, a) for q, a in FACTS[:4]])
    update_manifest(folder, "train", config=validate_config({"base_model": model_dir}).model_dump(mode="json"),
                    metrics={"train_loss": 1.0}, extra={"method": "lora", "base_model": model_dir})
    return folder


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "tailor.yaml").write_text(yaml.safe_dump({
        "project": "city", "base_model": tiny_model_dir, "system_prompt": SYSTEM,
        "train": {"dtype": "fp32", "save_every": 0, "batch_size": 4},
        "eval": {"max_new_tokens": 6, "batch_size": 8},
        "methods": {"lora": {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}},
        "improve": {"feedback_db": "feedback.db", "replay": 1, "train": {"max_steps": 4, "learning_rate": 1.0e-3},
                    "min_gain": -1.0, "max_regression": 1.0, "fail_over": ["perplexity=1.0e6"],
                    "canary_share": 0.5, "min_canary_samples": 6}}))
    registry = open_registry(*load_config(root))
    registry.register_run(production_run(tmp_path / "prod", tiny_model_dir), "city")
    registry.promote("city", 1, "production", reason="first version")
    return root


@pytest.fixture
def server(workspace, tiny_model_dir):
    """`tailor serve --registry` in a thread: production served as `city`, canaries routed by the watcher."""
    engine = Engine(tiny_model_dir, dtype=torch.float32, max_new_tokens=6)
    config, root = load_config(workspace)
    watcher = RegistryWatcher(engine, open_registry(config, root), interval=0.1)
    app = create_app(engine, ServeConfig(feedback_db=str(workspace / "feedback.db"), request_log=None, cache_size=0),
                     workspace, watcher=watcher)
    watcher.start()
    sock = bind_socket("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not uv.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", watcher
    uv.should_exit = True
    watcher.stop()
    engine.shutdown()


def ask(url, question, user):
    reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "city", "user": user, "temperature": 0, "max_tokens": 6,
        "messages": [{"role": "user", "content": question}]})
    assert reply.status_code == 200, reply.text
    return reply.json()["id"]


def thumbs(url, response_id, rating, correction=None):
    ack = httpx.post(f"{url}/v1/feedback", timeout=30, json={"response_id": response_id, "rating": rating,
                                                             "correction": correction})
    assert ack.status_code == 200, ack.text
    return ack.json()["id"]


def residents(url):
    """Eight residents each ask a question; four vote down and correct (one correction holds a private email, one
    is blank), four vote up. Returns {question: feedback id}."""
    ids = {}
    for i, (question, answer) in enumerate(FACTS):
        response = ask(url, question, f"resident-{i}")
        if i < 4:
            correction = answer + (" Write to ann.lee@gmail.com for help." if i == 1 else "")
            ids[question] = thumbs(url, response, "down", "   " if i == 3 else correction)
        else:
            ids[question] = thumbs(url, response, "up")
    return ids


def liked_earlier(db_path, count=2):
    """Up-voted answers with text (the tiny model answers blank lines, which the regression set leaves out), as
    the server records them."""
    store = FeedbackStore(db_path)
    for i, (question, answer) in enumerate(FACTS[4:4 + count]):
        store.record_completion(id=f"earlier-{i}", model="city", alias=None, endpoint="chat",
                                prompt=[{"role": "user", "content": question + " Please."}], answer=answer,
                                user=f"earlier-{i}", latency_ms=1.0, first_token_ms=1.0, completion_tokens=8)
        store.add_feedback(response_id=f"earlier-{i}", rating="up")
    store.close()


def cli(*args):
    """The `tailor` command in-process, as a user runs it: (exit status, output)."""
    from typer.testing import CliRunner

    from tailor.cli.app import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output + (str(result.exception) if result.exception and
                                              not isinstance(result.exception, SystemExit) else "")


def models_served(db_path, since_id=0):
    with sqlite3.connect(db_path) as db:
        return {row[0] for row in db.execute("SELECT model FROM completions WHERE rowid > ?", (since_id,))}


def vote(url, db_path, candidate, production, each=8):
    """Residents until each version has answered `each` of them; `candidate`/`production`: their thumbs."""
    counts = {"city": 0, candidate[0]: 0}
    i = 0
    while min(counts.values()) < each:
        response = ask(url, FACTS[i % len(FACTS)][0], f"voter-{i}")
        with sqlite3.connect(db_path) as db:
            (model,) = db.execute("SELECT model FROM completions WHERE id = ?", (response,)).fetchone()
        counts[model] += 1
        thumbs(url, response, candidate[1] if model == candidate[0] else production)
        i += 1
        assert i < 200, counts


def test_feedback_to_canary_to_promotion(workspace, server, capsys):
    url, watcher = server
    ids = residents(url)
    db_path = workspace / "feedback.db"
    liked_earlier(db_path)
    # the review queue: three corrections accepted, the blank one cannot be accepted
    status, output = cli("feedback", "review", *[str(ids[q]) for q, _ in FACTS[:3]], "--accept", "-w",
                         str(workspace))
    assert status == 0, output
    status, output = cli("feedback", "review", str(ids[FACTS[3][0]]), "--accept", "-w", str(workspace))
    assert status == 1 and "the correction is empty" in output and f"feedback {ids[FACTS[3][0]]}" in output

    config, root = load_config(workspace)
    lines = []
    outcome = run_improve(config, root, by="ops", show_progress=False, say=lines.append)
    assert outcome.outcome == "waiting", lines
    text = "\n".join(lines)
    assert f"feedback {ids[FACTS[3][0]]}: the correction is empty; left out" in text
    assert "3 corrections (1 with personal data redacted)" in text

    cycle = improve_folder(config, root) / "cycle-0001"
    sft = [record for _, record in read_jsonl(cycle / "data" / "train.jsonl")]
    corrections = [r for r in sft if "feedback_id" in r]
    assert sorted(r["feedback_id"] for r in corrections) == sorted(ids[q] for q, _ in FACTS[:3])
    assert len(sft) == 6  # improve.replay: 1 production record per correction
    answers = " ".join(r["messages"][-1]["content"] for r in corrections)
    assert "ann.lee@gmail.com" not in answers and "<EMAIL>" in answers
    comparison = [record["source"].split(":")[0] for _, record in read_jsonl(cycle / "eval" / "data" / "eval.jsonl")]
    # the held-out set holds the first four questions; the three corrected ones count as corrected only
    assert comparison.count("corrected") == 3 and comparison.count("heldout") == 1
    assert comparison.count("regression") == 2  # the up-voted answers with text

    registry = open_registry(config, root)
    candidate = registry.resolve("city@2")
    assert candidate.stage == "staging" and registry.parent_of(candidate).label == "city@1"
    assert sorted(registry.feedback_of(candidate)["sft"]) == sorted(ids[q] for q, _ in FACTS[:3])
    assert len(registry.feedback_of(candidate)["regression"]) == 2

    # the server routes half of the users asking for `city` to city@2 within a poll
    deadline = time.monotonic() + 20
    while "city@2" not in watcher.canaries.values():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # a rerun while the canary has too little evidence: waits, changes nothing
    assert run_improve(config, root, show_progress=False, say=lines.append).outcome == "waiting"
    vote(url, db_path, candidate=("city@2", "up"), production="down")
    status, output = cli("improve", "--decide", "--by", "ops", "-w", str(workspace), "--no-progress")
    assert status == 0 and "promoted" in output, output
    assert registry.resolve("city@production").label == "city@2"
    deadline = time.monotonic() + 20
    while watcher.served["city"].version != 2 or watcher.canaries:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    log = [(c.version.label, c.action, c.to_stage, c.changed_by) for c in registry.history("city")]
    assert log[-4:] == [("city@2", "register", "candidate", "ops"), ("city@2", "canary", "staging", "ops"),
                        ("city@1", "demote", "archived", "ops"), ("city@2", "promote", "production", "ops")]
    assert "Fisher p=" in registry.history("city")[-1].reason
    # nothing new since: the next run has nothing to learn (the corrections are in city@2's lineage)
    assert run_improve(config, root, show_progress=False, say=lines.append).outcome == "nothing_to_learn"


def test_a_candidate_failing_a_gate_is_refused_and_a_degrading_canary_rolled_back(workspace, server):
    # (the tiny model's loss sits at ln(vocab) whatever the learning rate, so "broken" is a gate it cannot meet
    # here; benchmarks/loop.py refuses a huge-learning-rate candidate of the real model on token F1)
    url, watcher = server
    ids = residents(url)
    review = [str(ids[q]) for q, _ in FACTS[:3]]
    assert cli("feedback", "review", *review, "--accept", "-w", str(workspace))[0] == 0
    config, root = load_config(workspace, ["improve.fail_under=[token_f1=0.9]"])
    lines = []
    outcome = run_improve(config, root, show_progress=False, say=lines.append)
    assert outcome.outcome == "refused" and outcome.exit_code == 3, lines
    assert "improve.fail_under: candidate.token_f1 0 < 0.9" in outcome.message
    registry = open_registry(config, root)
    assert registry.resolve("city@2").stage == "archived" and registry.history("city")[-1].action == "refuse"
    assert registry.resolve("city@production").label == "city@1" and not registry.active_canaries()

    # the same feedback, trained sanely, reaches the canary; its users vote it down and the monitor rolls it back
    config, root = load_config(workspace)
    assert run_improve(config, root, show_progress=False, say=lines.append).outcome == "waiting"
    deadline = time.monotonic() + 20
    while "city@3" not in watcher.canaries.values():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # 12 thumbs: TailorThumbsDownRateHigh needs at least 10 in the hour for the candidate's series
    vote(url, workspace / "feedback.db", candidate=("city@3", "down"), production="up", each=12)
    status, output = cli("improve", "--decide", "-w", str(workspace))
    assert status == 3 and "rolled back" in output and "TailorThumbsDownRateHigh" in output, output
    assert registry.resolve("city@3").stage == "archived" and registry.history("city")[-1].action == "rollback"
    assert registry.resolve("city@production").label == "city@1"
    deadline = time.monotonic() + 20
    while watcher.canaries:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert ask(url, "Where is City Hall?", "voter-0")  # everyone is answered by production again


def test_a_second_run_while_the_lock_is_held_changes_nothing(workspace):
    config, root = load_config(workspace)
    with hold_lock(lock_path(config, root)):
        with pytest.raises(LockedError, match="another `tailor improve` is running .*nothing was changed"):
            run_improve(config, root, show_progress=False)
        status, output = cli("improve", "-w", str(workspace))
    assert status != 0 and "Traceback" not in output
    assert not (improve_folder(config, root) / "state.json").exists()
    assert open_registry(config, root).resolve("city@production").label == "city@1"


def test_bad_input_is_one_line(workspace, tmp_path):
    raw = yaml.safe_load((workspace / "tailor.yaml").read_text())
    raw["improve"]["fail_under"] = ["helpfulness=0.5"]
    (workspace / "tailor.yaml").write_text(yaml.safe_dump(raw))
    status, output = cli("improve", "-w", str(workspace))
    assert status == 1 and "Traceback" not in output
    assert "improve.fail_under 'helpfulness=0.5': unknown metric 'helpfulness'" in " ".join(output.split())
    assert not (workspace / "improve").exists()  # refused before the lock, the state or any training
    raw["improve"]["fail_under"] = []
    raw["improve"]["feedback_db"] = "missing.db"
    (workspace / "tailor.yaml").write_text(yaml.safe_dump(raw))
    config, root = load_config(workspace)
    with pytest.raises(TailorError, match="improve.feedback_db: .*missing.db not found"):
        run_improve(config, root, show_progress=False, say=lambda line: None)


def test_feedback_for_an_unknown_version_is_left_out_with_its_id(workspace):
    store = FeedbackStore(workspace / "feedback.db")
    prompt = [{"role": "user", "content": FACTS[0][0]}]
    for response, model in (("r1", "city@9"), ("r2", "city")):
        store.record_completion(id=response, model=model, alias=None, endpoint="chat", prompt=prompt, answer="?",
                                user=None, latency_ms=1.0, first_token_ms=1.0, completion_tokens=1)
    unknown, _ = store.add_feedback(response_id="r1", rating="down", correction=FACTS[0][1])
    known, _ = store.add_feedback(response_id="r2", rating="down", correction=FACTS[0][1])
    store.review(unknown, "accepted", by="ops")
    store.review(known, "accepted", by="ops")
    store.close()
    config, root = load_config(workspace, ["improve.train.max_steps=1"])
    lines = []
    run_improve(config, root, show_progress=False, say=lines.append)
    assert any(f"feedback {unknown}: answered by city@9, a version the registry does not have (versions of city: "
               f"city@1" in line for line in lines), lines
    built = json.loads((improve_folder(config, root) / "state.json").read_text())
    assert built["current"]["stages"]["data"]["feedback_ids"]["sft"] == [known]


def test_kto_and_dpo_continue_from_the_sft_adapter(workspace):
    """sft → kto → dpo, each from the adapter the step before wrote; the candidate is the last run folder."""
    store = FeedbackStore(workspace / "feedback.db")
    for i, (question, answer) in enumerate(FACTS[:4]):
        prompt = [{"role": "user", "content": question}]
        for suffix, rating in (("a", "down"), ("b", "up")):
            store.record_completion(id=f"r{i}{suffix}", model="city", alias=None, endpoint="chat", prompt=prompt,
                                    answer=f"Maybe {i}{suffix}." if rating == "down" else answer, user=None,
                                    latency_ms=1.0, first_token_ms=1.0, completion_tokens=3)
            feedback_id, _ = store.add_feedback(response_id=f"r{i}{suffix}", rating=rating,
                                                correction=answer if rating == "down" else None)
            if rating == "down":
                store.review(feedback_id, "accepted", by="ops")
    store.close()
    config, root = load_config(workspace, ["improve.kto=true", "improve.dpo=true", "improve.train.max_steps=2"])
    lines = []
    assert run_improve(config, root, show_progress=False, say=lines.append).outcome == "waiting", lines
    state = json.loads((improve_folder(config, root) / "state.json").read_text())["current"]["stages"]
    assert list(state["train"]["steps"]) == ["sft", "kto", "dpo"]
    assert state["train"]["candidate"].endswith("dpo")
    assert state["data"]["counts"]["dpo"] == 8  # 4 corrections over their answers, 4 up-voted over down-voted
    manifest = json.loads((improve_folder(config, root) / "cycle-0001" / "dpo" / "manifest.json").read_text())
    assert manifest["config"]["methods"]["dpo"]["init_adapter"].endswith("kto/adapter")
    candidate = open_registry(config, root).resolve("city@2")
    # every up-voted question was also corrected, so none is a regression question
    assert sorted(open_registry(config, root).feedback_of(candidate)) == ["dpo", "kto", "sft"]


def test_improve_epochs_are_not_capped_by_the_first_runs_step_budget():
    from tailor.config import validate_config

    config = validate_config({"train": {"max_steps": 16, "learning_rate": 2.0e-3},
                              "improve": {"train": {"epochs": 8}}})
    assert (config.improve_train().max_steps, config.improve_train().epochs) == (0, 8)
    assert config.improve_train().learning_rate == 2.0e-3  # the rest from train:
    config = validate_config({"train": {"max_steps": 16}, "improve": {"train": {"epochs": 8, "max_steps": 5}}})
    assert config.improve_train().max_steps == 5


def test_changed_documents_give_a_grounded_candidate_an_updated_index(workspace, tmp_path):
    """No feedback at all, but a document changed and one was added: production answers from retrieved passages,
    so the candidate is production's adapter on a copy of its index where only those documents were embedded."""
    from tailor.cli.retrieval import build_run_index
    from tailor.data.ingest import ingest
    from tailor.retrieval.grounding import Grounding, write_retrieval_file

    docs = workspace / "docs"
    docs.mkdir()
    (docs / "hall.md").write_text("# City Hall\n\nCity Hall is at 400 Linden Avenue and opens at 8 am on weekdays.")
    (docs / "pool.md").write_text("# Pool\n\nThe municipal pool opens in June and closes in September each year.")
    raw = yaml.safe_load((workspace / "tailor.yaml").read_text())
    raw["sources"] = ["docs"]
    raw["ingest"] = {"min_chars": 10}
    (workspace / "tailor.yaml").write_text(yaml.safe_dump(raw))
    config, root = load_config(workspace)
    production = tmp_path / "prod"
    ingest([str(docs)], production / "corpus.jsonl", config.ingest, progress=False)
    build_run_index(config, root, production, show_progress=False)
    write_retrieval_file(production / "adapter", config, root, production)
    index_before = (production / "index" / "chunks.jsonl").read_bytes()
    FeedbackStore(workspace / "feedback.db")  # the server has had no feedback yet

    assert run_improve(config, root, show_progress=False, say=lambda line: None).outcome == "nothing_to_learn"
    (docs / "hall.md").write_text("# City Hall\n\nCity Hall moved to 12 Harbor Street and opens at 9 am on weekdays.")
    (docs / "library.md").write_text("# Library\n\nThe library lends e-readers for three weeks to card holders.")
    lines: list[str] = []
    outcome = run_improve(config, root, show_progress=False, say=lines.append)
    assert outcome.outcome == "waiting", lines  # a candidate in its canary
    assert "  documents: 1 added, 1 changed; index updated (2 chunks embedded, 1 reused)" in lines
    cycle = improve_folder(config, root) / "cycle-0002"
    candidate = Grounding.load(cycle / "documents-only" / "adapter")
    assert candidate is not None and candidate.retriever.index.folder == (cycle / "documents" / "index").resolve()
    passages = candidate.retriever.retrieve("Where is City Hall now?").passages
    assert "12 Harbor Street" in passages[0].text
    assert (production / "index" / "chunks.jsonl").read_bytes() == index_before  # production's index untouched
    registry = open_registry(config, root)
    assert registry.resolve("city@2").stage == "staging"
