"""`tailor data synth` with the real default model: answer-first pairs from several documents of the city example."""

import json

import pytest

from tailor.data.ingest import ingest
from tailor.data.synth import open_teacher, synthesize
from tests.conftest import EXAMPLE

pytestmark = pytest.mark.integration


def test_the_default_model_writes_questions_for_sentences_of_several_documents(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    ingest([str(EXAMPLE / "docs")], corpus, progress=False)
    chunks = {record["id"]: record for record in map(json.loads, corpus.read_text().splitlines())}
    teacher = open_teacher("smollm2-135m-instruct", batch_size=8)
    try:
        report = synthesize(corpus, teacher, max_chunks=6, per_chunk=2, phrasings=1, batch_size=6)
    finally:
        teacher.close()
    summary = report.to_dict()
    print({key: value for key, value in summary.items() if key != "rejected_examples"})
    assert summary["coverage"]["documents_with_pairs"] >= 3  # six chunks of six different documents
    assert len(report.kept) >= 4
    for pair in report.kept:  # answer-first: every answer is a sentence of its own chunk
        assert pair["answer"] in " ".join(chunks[pair["chunk_id"]]["text"].split())
        assert pair["question"].endswith("?")
