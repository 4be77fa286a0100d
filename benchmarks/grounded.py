"""Grounded answers from documents on two domains, with the default model: retrieval quality, answer quality,
citations and abstention per method, evaluated like `tailor eval`.

    python benchmarks/grounded.py [--quick] [--methods rag,lora,lora+rag] [--out FILE]
        → benchmarks/results/grounded.json   (domains.<domain>.methods.<method>.<metric>)

Domains: `city` (examples/city-services: Maplewood's documents, written for tailor, 98 held-out questions) and
`privoxy` (examples/privoxy-docs: Privoxy's manuals from Debian's privoxy package, which no one here wrote, 66
questions with the page holding each answer). Both add 12 questions the documents do not answer (qa/unanswerable
.jsonl), scored for abstention. Per domain: ingest, `tailor index` (timed from scratch, then again with nothing
changed), eval-file build, then `tailor compare`'s code trains or builds each method in runs/grounded/<domain>/ and
evaluates it with the `tailor eval` harness (the base model once). Per method the JSON has token F1 (all questions
and answerable ones), exact match, fact recall (the reference's content words found in the answer), recall@k and
MRR against the chunk holding each answer (or the question's page), faithfulness, citation accuracy, abstention
accuracy, false abstentions, and the latency of one answer (one question at a time, retrieval included). Retrieval
latency (embedded index, warm) is measured over every question alone.

--quick: the first 30 answerable and 6 unanswerable questions per domain (the base model is always scored).
Methods that train (lora, raft, lora+rag) need training pairs: they run on the city only; `--set raft:train.epochs=1`
changes one method's settings (recorded in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RESULTS = ROOT / "benchmarks" / "results" / "grounded.json"
RUNS = ROOT / "runs" / "grounded"  # runs/ is not versioned
DOMAINS = {"city": "city-services", "privoxy": "privoxy-docs"}
METRICS = ("token_f1", "answerable_token_f1", "exact_match", "fact_recall", "recall_at_1", "recall_at_5",
           "recall_at_10", "mrr", "document_recall_at_5", "faithfulness", "citation_accuracy", "abstention_accuracy", "false_abstention",
           "eval_loss", "retrieval_ms", "gold_known", "n")
GOALS = {"recall_at_5": 0.9, "rag_f1_ratio": 2.0, "citation_accuracy": 0.8, "index_seconds": 60.0,
         "retrieval_ms": 50.0}


def eval_subset(example: Path, out: Path, quick: bool) -> Path:
    """The domain's held-out questions plus the unanswerable ones, in one file (the first ones with --quick)."""
    answerable = (example / "qa" / "eval.jsonl").read_text().splitlines()
    unanswerable = (example / "qa" / "unanswerable.jsonl").read_text().splitlines()
    if quick:
        answerable, unanswerable = answerable[:30], unanswerable[:6]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(answerable + unanswerable) + "\n")
    return out


def run_domain(domain: str, methods: list[str], quick: bool, method_overrides: dict[str, list[str]]) -> dict:
    from tailor.cli.compare import compare_table, method_name, run_compare
    from tailor.cli.common import console
    from tailor.cli.demo import find_example
    from tailor.cli.retrieval import build_run_index
    from tailor.config import load_config
    from tailor.data.build import build_chat_data
    from tailor.data.ingest import ingest
    from tailor.retrieval.grounding import index_folder
    from tailor.retrieval.search import Retriever
    from tailor.workspace import read_json, read_jsonl

    example = find_example(DOMAINS[domain])
    run_dir = RUNS / domain
    questions = eval_subset(example, run_dir / "questions.jsonl", quick)
    config, root = load_config(example, [f"data.eval_files=[{questions}]"])
    if not config.data.qa_files:  # no training pairs in this domain: only methods that need none
        from tailor.methods import registry

        methods = [m for m in methods if not registry.get(method_name(m)).needs_data]
    console.rule(f"[bold]{domain}[/]: {', '.join(methods)}")
    ingest([str(root / source) for source in config.sources], run_dir / "corpus.jsonl",
           chunk_chars=config.ingest.chunk_chars, chunk_overlap=config.ingest.chunk_overlap,
           min_chars=config.ingest.min_chars, progress=False)
    folder = index_folder(config, root, run_dir)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    from tailor.methods.prompt import load_embedder

    load_embedder.cache_clear()  # the first build pays the embedding model's load, as a fresh `tailor index` does
    started = time.perf_counter()
    built, _ = build_run_index(config, root, run_dir, show_progress=False)
    index_seconds = time.perf_counter() - started
    started = time.perf_counter()
    rebuilt, _ = build_run_index(config, root, run_dir, show_progress=False)
    reindex_seconds = time.perf_counter() - started
    build_chat_data(config, root, run_dir)

    retriever = Retriever(folder, config.retrieval)
    asked = [record["messages"][-2]["content"] for _, record in read_jsonl(run_dir / "data" / "eval.jsonl")]
    retriever.retrieve(asked[0])  # warm: the embedding model is loaded once per process
    timings = []
    for question in asked:
        began = time.perf_counter()
        retriever.retrieve(question)
        timings.append((time.perf_counter() - began) * 1000)

    overrides = {name: values for name, values in method_overrides.items() if name in methods}
    summary = run_compare(config, root, run_dir, methods, latency_questions=3, keep_going=True,
                          method_overrides=overrides)
    console.print(compare_table(summary))
    rows = {row["method"]: row for row in summary["methods"]}
    results = {}
    for position, name in enumerate(methods):
        if name not in rows:
            continue
        report = read_json(run_dir / "compare" / name / "eval" / "report.json")
        scores = report["models"][method_name(name)]
        if position == 0:
            base = report["models"]["base"]
            results["base"] = {**{key: base.get(key) for key in METRICS if key in base},
                               "latency_ms": summary["base"]["latency_ms"]}
        results[name] = {**{key: scores.get(key) for key in METRICS if key in scores},
                         "latency_ms": rows[name]["latency_ms"], "train_seconds": rows[name]["train_seconds"]}
    return {
        "example": f"examples/{DOMAINS[domain]}", "questions": len(asked),
        "unanswerable": sum(1 for _, r in read_jsonl(run_dir / "data" / "eval.jsonl") if r.get("answerable") is False),
        "index": {"documents": built.documents, "chunks": built.chunks, "build_seconds": round(index_seconds, 2),
                  "reindex_seconds": round(reindex_seconds, 2), "reindex_embedded": rebuilt.embedded,
                  "retrieval_ms_p50": round(statistics.median(timings), 2),
                  "retrieval_ms_p95": round(sorted(timings)[int(0.95 * (len(timings) - 1))], 2),
                  "settings": config.retrieval.model_dump(mode="json")},
        "methods": results, "failed": summary.get("failed", {}), "method_overrides": overrides,
    }


def goals(domains: dict) -> dict:
    """Each goal of the grounded-answers issue, with the measured value and whether it is met."""
    checks = {}
    for name, result in domains.items():
        rag, base = result["methods"].get("rag", {}), result["methods"].get("base", {})
        checks[f"{name}.recall_at_5"] = (rag.get("recall_at_5"), GOALS["recall_at_5"], ">=")
        checks[f"{name}.citation_accuracy"] = (rag.get("citation_accuracy"), GOALS["citation_accuracy"], ">=")
        checks[f"{name}.retrieval_ms_p50"] = (result["index"]["retrieval_ms_p50"], GOALS["retrieval_ms"], "<=")
        checks[f"{name}.index_seconds"] = (result["index"]["build_seconds"], GOALS["index_seconds"], "<=")
        if base.get("answerable_token_f1") and rag.get("answerable_token_f1") is not None:
            ratio = round(rag["answerable_token_f1"] / base["answerable_token_f1"], 3)
            checks[f"{name}.rag_f1_over_base"] = (ratio, GOALS["rag_f1_ratio"], ">=")
    return {key: {"value": value, "goal": f"{op} {goal}",
                  "met": value is not None and (value >= goal if op == ">=" else value <= goal)}
            for key, (value, goal, op) in checks.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="36 questions per domain, rag only.")
    parser.add_argument("--methods", default=None, help="Comma-separated methods (default: rag; quick: rag).")
    parser.add_argument("--domains", default="city,privoxy", help="Comma-separated domains.")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="An override for one method, e.g. raft:train.epochs=1 (repeatable).")
    parser.add_argument("--out", type=Path, default=RESULTS, help="Results JSON.")
    args = parser.parse_args()

    from tailor.cli.app import _quiet_libraries
    from tailor.workspace import now_iso, write_json

    _quiet_libraries()
    methods = [m.strip() for m in (args.methods or "rag").split(",") if m.strip()]
    started, load_before = time.perf_counter(), os.getloadavg()
    method_overrides: dict[str, list[str]] = {}
    for item in args.set:
        method, _, override = item.partition(":")
        method_overrides.setdefault(method, []).append(override)
    domains = {name: run_domain(name, methods, args.quick, method_overrides) for name in args.domains.split(",")}
    result = {"created_at": now_iso(), "quick": args.quick, "base_model": "smollm2-135m-instruct",
              "methods": methods, "domains": domains, "goals": goals(domains),
              "load_average": {"before": [round(x, 2) for x in load_before],
                               "after": [round(x, 2) for x in os.getloadavg()]},
              "total_seconds": round(time.perf_counter() - started, 1)}
    write_json(args.out, result)
    print(json.dumps(result["goals"], indent=1))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
