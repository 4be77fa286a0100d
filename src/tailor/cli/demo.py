"""`tailor demo`: the whole path on the bundled city example: ingest → index → data → train → eval → serve (the
customized model, and `rag`: the base model answering from the index with sources)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from tailor.cli.common import console
from tailor.config import CONFIG_NAME, load_config
from tailor.errors import TailorError

EXAMPLE = "city-services"
# --quick: fewer steps and questions, for tests and a first look
QUICK_OVERRIDES = ["train.epochs=2", "eval.limit=30"]


def find_example(name: str = EXAMPLE) -> Path:
    candidates = [Path.cwd() / "examples" / name, Path(__file__).resolve().parents[3] / "examples" / name]
    for folder in candidates:
        if (folder / CONFIG_NAME).is_file():
            return folder
    raise TailorError(f"demo: the example '{name}' was not found (looked in {', '.join(map(str, candidates))}); "
                      f"run the demo from the repository root")


def demo(out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run folder to create."),
         no_serve: bool = typer.Option(False, "--no-serve", help="Stop after evaluation."),
         quick: bool = typer.Option(False, "--quick", help="A shorter run (for tests)."),
         port: int = typer.Option(8000, "--port", "-p", help="Port for the chat page."),
         from_documents: bool = typer.Option(False, "--from-documents", help=(
             "No hand-written training pairs: the base model writes them from the documents (`tailor data "
             "synth`), and `raft` trains on them with retrieved passages; evaluated on the same held-out "
             "questions.")),
         overrides: list[str] = typer.Argument(None, help="Dotted overrides applied to the example's config."),
         no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars.")) -> None:
    """Run the city-services example end to end on the default model, then serve the chat page."""
    from tailor.cli.retrieval import build_run_index
    from tailor.cli.serving import build_engine
    from tailor.data.build import build_chat_data
    from tailor.data.ingest import ingest
    from tailor.evaluate.harness import report_table, run_eval
    from tailor.methods.artifacts import build_artifact
    from tailor.train.run import BuildResult, run_training
    from tailor.workspace import update_manifest, write_json, write_jsonl

    example = find_example()
    out.mkdir(parents=True, exist_ok=True)
    synthetic = (out / "data" / "synth.jsonl").resolve()
    # documents only: the example's hand-written pairs are replaced by the synthetic ones, its held-out questions stay
    documents_only = [f"data.qa_files=[{synthetic}]", "train.method=raft"] if from_documents else []
    config, root = load_config(example, (QUICK_OVERRIDES if quick else []) + documents_only + list(overrides or []))
    timings: dict[str, float] = {}

    def stage(name: str):
        console.rule(f"[bold]{name}")
        timings[name] = time.perf_counter()

    def done(name: str):
        timings[name] = round(time.perf_counter() - timings[name], 1)

    stage("ingest")
    summary = ingest([str(root / s) for s in config.sources], out / "corpus.jsonl", config.ingest,
                     progress=not no_progress)
    write_json(out / "corpus.report.json", summary.to_dict())
    update_manifest(out, "ingest", inputs=[], outputs=[out / "corpus.jsonl"],
                    metrics={"records": summary.records, "files_read": summary.files_read,
                             "duplicates": len(summary.duplicates)})
    console.print(f"{summary.files_read} files → {summary.records} chunks, {len(summary.duplicates)} duplicates "
                  f"removed, {len(summary.skipped)} skipped")
    done("ingest")

    stage("index")
    indexed, _ = build_run_index(config, root, out, show_progress=not no_progress)
    console.print(f"{indexed.chunks} chunks indexed for retrieval (BM25 + all-MiniLM-L6-v2) in {indexed.seconds} s")
    done("index")

    if from_documents:
        from tailor.data.synth import open_teacher, synthesize

        stage("synth")
        teacher = open_teacher(config.base_model, root=root, dtype=config.train.dtype)
        try:
            synth = synthesize(out / "corpus.jsonl", teacher, max_chunks=16 if quick else 0, seed=config.data.seed,
                               progress=synthetic.with_name("synth.progress.jsonl"))
        finally:
            teacher.close()
        write_jsonl(synthetic, synth.kept)
        write_json(synthetic.with_name("synth.report.json"), synth.to_dict())
        coverage = synth.to_dict()["coverage"]
        console.print(f"{len(synth.kept)} question/answer pairs written by the base model from {synth.chunks} chunks "
                      f"({coverage['documents_with_pairs']} of {synth.documents} documents)")
        done("synth")

    stage("data")
    built = build_chat_data(config, root, out)
    console.print(f"{built.train} training and {built.eval} evaluation records")
    done("data")

    stage(f"train ({config.train.method})")
    result = run_training(config, root, out, show_progress=not no_progress)
    if isinstance(result, BuildResult):
        console.print(f"built from {result.examples} training examples (nothing trained)")
    else:
        console.print(f"{result.steps} steps, train loss {result.train_loss:.4f}, "
                      f"{result.tokens_per_s:,.0f} tokens/s")
    done(f"train ({config.train.method})")

    if config.train.method != "rag":
        # served beside the customized model: the base answering from the index, with sources
        rag_config = config.model_copy(update={"train": config.train.model_copy(update={"method": "rag"})})
        build_artifact([], out, rag_config, root)

    stage("eval")
    report = run_eval(config, root, out, show_progress=not no_progress)
    done("eval")
    console.print(report_table(report))
    timings["total"] = round(sum(timings.values()), 1)
    update_manifest(out, "demo", extra={"timings_s": timings, "quick": quick, "from_documents": from_documents})
    console.print("timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    console.print(f"run folder: {out}")

    if not no_serve:
        from tailor.serve.app import serve

        serve(build_engine(config, root, out), "127.0.0.1", port, config=config.serve, root=root, state_dir=out)
