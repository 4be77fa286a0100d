import json
import time

import pytest

from tailor.data.qa import build_chat_datasets, in_eval_split, read_qa_file
from tailor.errors import TailorError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_and_csv_pairs(tmp_path):
    jsonl = write(tmp_path / "a.jsonl",
                  '{"question": "Q1?", "answer": "A1."}\n\n{"instruction": "Q2?", "output": "A2."}\n')
    csv_file = write(tmp_path / "b.csv", 'question,answer\n"Q3, with comma?",A3.\n')
    pairs = list(read_qa_file(jsonl)) + list(read_qa_file(csv_file))
    assert [(p.question, p.answer) for p in pairs] == [("Q1?", "A1."), ("Q2?", "A2."), ("Q3, with comma?", "A3.")]
    assert pairs[1].source.endswith("a.jsonl:3")
    assert pairs[2].source.endswith("b.csv:2")


@pytest.mark.parametrize("text, expected", [
    ('{"question": "Q?", "answer": "A."}\n{"question": "Q?"\n', r"a\.jsonl:2: invalid JSON"),
    ('{"question": "Q?", "answer": "A."}\n{"question": "Q?"}\n', r"a\.jsonl:2: missing the answer"),
    ('{"question": "Q?", "answer": ""}\n', r"a\.jsonl:1: \"answer\" is empty"),
    ('{"question": 3, "answer": "A"}\n', r"a\.jsonl:1: \"question\" must be a string"),
    ('[1, 2]\n', r"a\.jsonl:1: expected a JSON object"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, text, expected):
    path = write(tmp_path / "a.jsonl", text)
    with pytest.raises(TailorError, match=expected):
        list(read_qa_file(path))


def test_malformed_csv_names_line(tmp_path):
    path = write(tmp_path / "b.csv", "question,answer\nQ1,A1\nQ2,A2,extra\n")
    with pytest.raises(TailorError, match=r"b\.csv:3: more fields than the header"):
        list(read_qa_file(path))


def test_missing_file(tmp_path):
    with pytest.raises(TailorError, match="file not found"):
        list(read_qa_file(tmp_path / "nope.csv"))


def test_split_is_deterministic_and_reports_long_records(tmp_path):
    rows = [{"question": f"Question number {i}?", "answer": f"Answer {i}."} for i in range(200)]
    rows.append({"question": "Long?", "answer": "word " * 300})
    path = write(tmp_path / "qa.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    count = lambda messages: sum(len(m["content"].split()) for m in messages)  # noqa: E731
    runs = [build_chat_datasets([path], [], system_prompt="Be brief.", eval_fraction=0.2, seed=1, max_tokens=100,
                                count_tokens=count) for _ in range(2)]
    (train, evals, summary), (train2, evals2, _) = runs
    assert train == train2 and evals == evals2
    assert 20 <= len(evals) <= 60 and len(train) + len(evals) == 200
    assert summary.too_long == [f"{path}:201: 303 tokens, over the limit of 100 (data.max_tokens)"]
    assert train[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert in_eval_split("Question number 3?", 0.2, 1) == in_eval_split("question number 3?", 0.2, 1)


# --- synthetic Q/A from documents --------------------------------------------------------------------------------

PASSAGE = ("The municipal pool opens on June 1 and closes on Labor Day. Lap swimming runs from 6 to 8 am on "
           "weekdays. Season passes cost 40 dollars for residents.")


def test_grounding_filter_on_crafted_pairs():
    from tailor.data.synth import SynthReport, grounding, judge_pairs

    assert grounding("Season passes cost 40 dollars for residents.", PASSAGE).score == 1.0
    invented = grounding("Passes cost 55 dollars.", PASSAGE)
    assert invented.missing_numbers == ["55"] and not invented.passes(0.5)
    off_topic = grounding("The library lends museum tickets on Fridays.", PASSAGE)
    assert off_topic.score < 0.2 and not off_topic.passes(0.75)
    report = SynthReport(threshold=0.75)
    chunk = {"id": "c1", "text": PASSAGE, "source": "docs/pool.md", "page": None}
    judge_pairs([("When does the pool open?", "The pool opens on June 1."),
                 ("How much is a pass?", "A season pass costs 55 dollars."),
                 ("Is there lap swimming?", "Yes."),
                 ("Who runs the pool?", "The parks department staff manage it daily.")], chunk, 0.75, report)
    assert [(r["question"], r["grounding"], r["chunk_id"], r["source"]) for r in report.kept] == [
        ("When does the pool open?", 1.0, "c1", "docs/pool.md")]
    assert [r["reason"] for r in report.rejected] == [
        "numbers not in the passage: 55", "answer has fewer than 2 content words", "grounding 0.00 < 0.75"]
    assert report.to_dict()["kept_share"] == 0.25


def test_pairs_are_parsed_from_model_text():
    from tailor.data.synth import parse_pairs

    text = ("Here are the pairs:\n1. Q: When does the pool open?\nA: On June 1.\n\n**Q2:** How much is a pass?\n"
            "**A2:** 40 dollars\nfor residents.\nQ: When does the pool open?\nA: June.\nQuestion: Unanswered?")
    assert parse_pairs(text) == [("When does the pool open?", "On June 1."),
                                 ("How much is a pass?", "40 dollars for residents.")]


def test_synthesize_runs_the_engine_over_the_corpus_and_resumes(tmp_path, tiny_model_dir):
    from tailor.data.synth import EngineTeacher, synthesize

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": f"c{i}", "text": PASSAGE, "source": f"doc{i % 2}.md",
                                            "page": None}) for i in range(3)) + "\n")
    teacher = EngineTeacher(tiny_model_dir, batch_size=2, dtype="fp32")
    try:
        seen, progress = [], tmp_path / "synth.progress.jsonl"
        report = synthesize(corpus, teacher, per_chunk=2, max_chunks=2, max_new_tokens=16, batch_size=2,
                            progress=progress, on_chunk=seen.append)
        assert report.chunks == 2 and seen == [2]  # a random tiny model writes no pairs; the path runs end to end
        assert report.generated == len(report.kept) + len(report.rejected)
        assert report.documents == 2 and report.to_dict()["chunks_per_s"] > 0
        assert len(progress.read_text().splitlines()) == 1 + 2  # the settings, then one line per chunk
        again = synthesize(corpus, teacher, per_chunk=2, max_chunks=2, max_new_tokens=16, batch_size=2,
                           progress=progress)
        assert again.resumed_chunks == 2  # nothing generated twice
        other = synthesize(corpus, teacher, per_chunk=1, max_chunks=2, max_new_tokens=16, batch_size=2,
                           progress=progress)
        assert other.resumed_chunks == 0  # other settings: started over
        with pytest.raises(TailorError, match="--threshold must be above 0"):
            synthesize(corpus, teacher, threshold=0)
    finally:
        teacher.close()


def test_a_sample_of_chunks_covers_every_document_and_phrasings_are_parsed():
    from tailor.data.synth import phrasings_of, spread

    chunks = [{"id": f"{doc}-{i}", "source": doc} for doc in ("a.md", "b.md", "c.md") for i in range(4)]
    sample = spread(chunks, 3)
    assert sorted(c["source"] for c in sample) == ["a.md", "b.md", "c.md"]  # not the first 3 chunks of a.md
    assert spread(chunks, 3) == sample and len(spread(chunks, 0)) == 12
    text = ("1. When does the pool open?\n2. When does the pool open?\n- A resident could ask: What date does the "
            "pool open for the season?\nSure!")
    assert phrasings_of(text, "When does the pool open?", 2) == ["What date does the pool open for the season?"]


def test_answer_first_takes_fact_sentences_as_answers_and_finds_their_question():
    from tailor.data.synth import fact_sentences, question_of

    facts = fact_sentences(PASSAGE + " It is nice.", 2)
    assert facts == ["The municipal pool opens on June 1 and closes on Labor Day.",
                     "Lap swimming runs from 6 to 8 am on weekdays."]  # most facts first, kept in document order
    assert question_of("Sure! Here it is:\nQuestion: When does lap swimming run on weekdays?", facts[1]) == \
        "When does lap swimming run on weekdays?"
    assert question_of("What is the capital of France?", facts[1]) is None  # about something else
    assert question_of("Lap swimming runs early.", facts[1]) is None  # no question at all


def test_an_endpoint_teacher_that_stops_answering_leaves_a_resumable_run(tmp_path, tiny_model_dir):
    import threading

    import torch
    import uvicorn

    from tailor.data.synth import EndpointTeacher, synthesize
    from tailor.serve.app import bind_socket, create_app
    from tailor.serve.engine import Engine

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": f"c{i}", "text": PASSAGE, "source": f"doc{i}.md"})
                                for i in range(4)) + "\n")
    engine = Engine(tiny_model_dir, dtype=torch.float32, max_new_tokens=8)
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]

    def start(sock):  # a real OpenAI-compatible server: tailor's own, on the tiny model
        server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="error"))
        threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        while not server.started:
            time.sleep(0.02)
        return server

    server = start(sock)
    teacher = EndpointTeacher(f"http://127.0.0.1:{port}/v1", "base", concurrency=2)
    progress = tmp_path / "synth.progress.jsonl"

    def stop_after_first_batch(count):
        server.should_exit = True  # the endpoint goes away after two chunks
        while server.started and not server.should_exit:
            time.sleep(0.02)
        time.sleep(0.5)

    settings = {"max_chunks": 4, "max_new_tokens": 8, "batch_size": 2, "phrasings": 0, "progress": progress}
    try:
        with pytest.raises(TailorError, match="failed .*run the same command again to resume"):
            synthesize(corpus, teacher, on_chunk=stop_after_first_batch, **settings)
        assert len(progress.read_text().splitlines()) == 1 + 2  # the two finished chunks are kept
        server = start(bind_socket("127.0.0.1", port))  # the endpoint is back
        resumed = synthesize(corpus, teacher, **settings)
        assert resumed.resumed_chunks == 2 and resumed.chunks == 4
        assert len(progress.read_text().splitlines()) == 1 + 4
    finally:
        server.should_exit = True
        engine.shutdown()


def test_a_judge_keeps_only_pairs_it_scores_high_enough(tmp_path, tiny_model_dir):
    import torch

    from tailor.config import TailorConfig
    from tailor.data.synth import SynthReport, _judged, judge_pairs
    from tailor.evaluate.sources import ModelSpec, open_model

    chunk = {"id": "c0", "text": PASSAGE, "source": "pool.md"}
    pairs = [("When does the pool open?", "The municipal pool opens on June 1."),
             ("How much is a season pass?", "Season passes cost 40 dollars for residents."),
             ("When is lap swimming?", "Lap swimming runs from 6 to 8 am on weekdays.")]

    def grounded():
        report = SynthReport(threshold=0.75)
        judge_pairs(pairs, chunk, 0.75, report)
        assert len(report.kept) == 3
        return [(chunk, report)]

    spec = ModelSpec("judge", "export", str(tiny_model_dir))
    with open_model(spec, TailorConfig(), str(tiny_model_dir), torch.float32) as judge:
        lenient, strict = grounded(), grounded()
        _judged(judge, lenient, 1, batch_size=2)
        _judged(judge, strict, 5, batch_size=2)
    scored = lenient[0][1].kept
    assert len(scored) == 3 and all(1 <= pair["judge_score"] <= 5 for pair in scored)
    assert all(1 <= pair["judge_expected_score"] <= 5 for pair in scored)  # a local judge: option probabilities
    fives = [pair["question"] for pair in scored if pair["judge_score"] == 5]
    assert [pair["question"] for pair in strict[0][1].kept] == fives  # same judge, same scores: the rest rejected
    assert all(r["reason"] == f"judge score {r['judge_score']} < 5" for r in strict[0][1].rejected)
    report = SynthReport(rejected=strict[0][1].rejected + [{"reason": "grounding 0.50 < 0.75"},
                                                           {"reason": "grounding 0.20 < 0.75"}])
    reasons = report.to_dict()["rejected_by_reason"]
    assert reasons.get("grounding") == 2 and reasons.get("judge score", 0) == 3 - len(fives)
