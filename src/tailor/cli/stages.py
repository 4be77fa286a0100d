"""The pipeline stages as commands: ingest, data, train, eval."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tailor.cli.common import OverridesArgument, RunOption, WorkspaceOption, console, open_workspace, run_folder
from tailor.errors import TailorError
from tailor.workspace import update_manifest, write_json

data_app = typer.Typer(help="Build and validate datasets.", no_args_is_help=True)


def ingest(sources: list[Path] = typer.Argument(None, help="Files or folders (default: `sources` in tailor.yaml)."),
           output: Path = typer.Option(None, "--output", "-o", help="Output JSONL (default: RUN/corpus.jsonl)."),
           workspace: Path = WorkspaceOption, run: Path = RunOption,
           pii: str = typer.Option(None, "--pii", help="Personal data: redact, mask or pseudonymize "
                                                       "(default: ingest.pii in tailor.yaml, off)."),
           pii_keep: list[str] = typer.Option(None, "--pii-keep", help="Regex of findings to keep as written, e.g. "
                                              "'@maplewood\\.gov$' (repeatable; adds to ingest.pii_keep)."),
           crawl: list[str] = typer.Option(None, "--crawl", help="Crawl this site from a page or sitemap .xml URL "
                                           "(repeatable; same site only, robots.txt honoured) into RUN/crawl/, "
                                           "resumable, and ingest the pages."),
           max_pages: int = typer.Option(50, "--max-pages", min=1, help="Crawl at most this many pages."),
           max_depth: int = typer.Option(2, "--max-depth", min=0, help="Follow links at most this deep."),
           delay: float = typer.Option(1.0, "--delay", min=0.0, help="Seconds between requests to one site."),
           workers: int = typer.Option(None, "--workers", min=1, help="Processes reading files in parallel "
                                       "(default: ingest.workers in tailor.yaml, 1); the corpus is the same."),
           no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar.")) -> None:
    """Read documents (txt, md, html, pdf, docx, csv/tsv, json/jsonl records, chat logs) or crawled web pages into
    normalized, cleaned, deduplicated chunks in corpus.jsonl; --pii replaces personal data."""
    from tailor.data.ingest import ingest as run_ingest

    overrides = ([f"ingest.pii={pii}"] if pii else []) + ([f"ingest.workers={workers}"] if workers else [])
    config, root = open_workspace(workspace, overrides, required=not (sources or crawl))
    run_dir = run_folder(root, run)
    names = [str(s) for s in sources] if sources else [] if crawl else [str(root / s) for s in config.sources]
    output = output or run_dir / "corpus.jsonl"
    source_names = {}
    if crawl:
        from tailor.data.crawl import crawl as run_crawl

        crawl_dir = run_dir / "crawl"
        crawled = run_crawl(list(crawl), crawl_dir, max_pages=max_pages, max_depth=max_depth, delay=delay,
                            on_page=None if no_progress else lambda url: console.print(f"  crawled {url}",
                                                                                       highlight=False))
        console.print(f"[green]crawled[/] {len(crawled.pages)} pages into {crawl_dir}"
                      + (f"; {crawled.remaining} more queued (rerun to continue)" if crawled.remaining else ""),
                      highlight=False, soft_wrap=True)
        for url, reason in crawled.skipped:
            console.print(f"  [yellow]skipped[/] {url}: {reason}", highlight=False, soft_wrap=True)
        if not crawled.pages:
            raise TailorError(f"--crawl: no page could be fetched from {', '.join(crawl)}")
        source_names = {str(crawl_dir / name): url for url, name in crawled.pages.items()}
        names.append(str(crawl_dir))
    summary = run_ingest(names, output, config.ingest, pii_keep=config.ingest.pii_keep + list(pii_keep or []),
                         source_names=source_names, progress=not no_progress)
    write_json(output.with_name(output.stem + ".report.json"), summary.to_dict())
    if output.parent == run_dir:
        update_manifest(run_dir, "ingest", outputs=[output],
                        metrics={"records": summary.records, "files_read": summary.files_read,
                                 "duplicates": len(summary.duplicates),
                                 "near_duplicates": sum(len(c.removed) for c in summary.near_duplicates),
                                 "pii_replaced": sum(summary.pii_counts.values()), "skipped": len(summary.skipped)})
    console.print(f"[green]ingested[/] {summary.files_read} files, {summary.documents} documents → "
                  f"{summary.records} records in {output}")
    for removed, kept in summary.duplicates:
        console.print(f"  duplicate removed: {removed} (kept {kept})")
    for cluster in summary.near_duplicates:
        for removed, similarity in cluster.removed:
            console.print(f"  near duplicate removed: {removed} ({similarity:.0%} similar; kept {cluster.kept})")
    if summary.pii_mode:
        counts = ", ".join(f"{kind} {count}" for kind, count in sorted(summary.pii_counts.items())) or "none found"
        pii_kept = sum(summary.pii_kept.values())
        console.print(f"  personal data ({summary.pii_mode}): {counts}"
                      + (f"; {pii_kept} kept by ingest.pii_keep" if pii_kept else ""))
    for path, reason in summary.skipped:
        console.print(f"  [yellow]skipped[/] {path}: {reason}")
    if summary.boilerplate_lines:
        console.print(f"  boilerplate: {summary.boilerplate_lines} lines repeated across documents removed")
    for label, reason in summary.filtered:
        console.print(f"  [yellow]filtered[/] {label}: {reason}", highlight=False, soft_wrap=True)
    for warning in summary.warnings:
        console.print(f"  [yellow]warning[/] {warning}")


@data_app.command("build")
def data_build(overrides: list[str] = OverridesArgument, workspace: Path = WorkspaceOption,
               run: Path = RunOption) -> None:
    """Q/A, Alpaca, ShareGPT, OpenAI chat or transcript files → chat records in RUN/data/train.jsonl, eval.jsonl
    (test.jsonl); also classification, preference and pre-training data when configured (data.*)."""
    from rich.markup import escape

    from tailor.data.build import build_chat_data

    config, root = open_workspace(workspace, overrides)
    run_dir = run_folder(root, run)
    summary = build_chat_data(config, root, run_dir)
    test = f" and {summary.test} test" if summary.test else ""
    console.print(f"[green]data[/] {summary.train} training, {summary.eval} evaluation{test} records → "
                  f"{run_dir / 'data'}", soft_wrap=True, highlight=False)
    for problem in summary.too_long + summary.duplicates + summary.leaked:
        console.print(f"  [yellow]dropped[/] {escape(problem)}", soft_wrap=True, highlight=False)
    classification = summary.extra.get("classification")
    if classification:
        console.print(f"  classification: {classification['train']} train, {classification['eval']} eval, "
                      f"{classification['test']} test over {len(classification['labels'])} labels", highlight=False)
        for problem in classification["duplicates"] + classification["leaked"]:
            console.print(f"  [yellow]dropped[/] {escape(problem)}", soft_wrap=True, highlight=False)
    if "preference_pairs" in summary.extra:
        console.print(f"  preference pairs: {summary.extra['preference_pairs']}", highlight=False)
    if "pretrain_blocks" in summary.extra:
        blocks = summary.extra["pretrain_blocks"]
        console.print(f"  pre-training blocks: {blocks['train']} train, {blocks['eval']} eval", highlight=False)


@data_app.command("validate")
def data_validate(files: list[Path] = typer.Argument(..., help="Chat JSONL or question/answer CSV/TSV/JSONL files."),
                  skip_invalid: bool = typer.Option(False, "--skip-invalid",
                                                    help="Write the valid records to --output and exit 0."),
                  output: Path = typer.Option(None, "--output", "-o", help="Where --skip-invalid writes (JSONL, "
                                              "or CSV/TSV for question/answer records)."),
                  max_tokens: int = typer.Option(None, "--max-tokens", min=1, help=(
                      "Report records longer than this many tokens (default: data.max_tokens when tailor.yaml "
                      "sets it, else the base model's context length).")),
                  tokenizer: Path = typer.Option(None, "--tokenizer", help="Tokenizer folder for the token count "
                                                 "(default: the configured base model's)."),
                  labels: str = typer.Option(None, "--labels", help="Comma-separated label set of classification "
                                             "records {text, label} (default: data.labels in tailor.yaml, if any)."),
                  eval_files: list[Path] = typer.Option(None, "--eval", help="Held-out file(s): also checked for "
                                                        "leakage, copies or near copies of training examples."),
                  leak_threshold: float = typer.Option(0.8, "--leak-threshold", min=0.01, max=1.0,
                                                       help="Similarity (word 3-gram Jaccard) that counts as leakage."),
                  workspace: Path = WorkspaceOption,
                  show: int = typer.Option(50, "--show", min=0, help="Print at most this many problems.")) -> None:
    """Check every record: JSON, keys, roles and their order, content, assistant turn, tokens, labels, duplicates,
    train/eval leakage."""
    from tailor.data.validate import OPENAI_CHECKS, validate_files, write_valid

    if skip_invalid and output is None:
        raise TailorError("--skip-invalid needs --output FILE for the valid records")
    if output is not None and not skip_invalid:
        raise TailorError("--output is only written with --skip-invalid")
    if tokenizer is not None and not (Path(tokenizer) / "tokenizer_config.json").is_file():
        raise TailorError(f"--tokenizer: {tokenizer} is not a tokenizer folder (no tokenizer_config.json)")
    if skip_invalid and eval_files:
        raise TailorError("--skip-invalid writes one file; validate the held-out file apart, or drop --eval")
    config, root = open_workspace(workspace, [], required=False)
    if labels is not None:
        label_set = [label.strip() for label in labels.split(",") if label.strip()]
        if not label_set:
            raise TailorError("--labels: give the labels separated by commas, e.g. --labels billing,outage")
    else:
        label_set = config.data.labels or None
    max_tokens = max_tokens or token_limit(config, root)
    count_tokens = _token_counter(tokenizer, config, root)
    report = validate_files(files, count_tokens=count_tokens, max_tokens=max_tokens, labels=label_set,
                            eval_paths=eval_files or [], leak_threshold=leak_threshold)
    for problem in report.problems[:show]:
        console.print(str(problem), highlight=False, markup=False, soft_wrap=True)
    if len(report.problems) > show:
        console.print(f"… and {len(report.problems) - show} more (--show N)")
    by_kind = ", ".join(f"{kind} {count}" for kind, count in report.counts_by_kind().items())
    openai = ", ".join(f"{check} {count}" for check, count in report.openai_counts().items())
    console.print(f"{report.records} records in {len(report.files)} file(s): {len(report.valid)} valid, "
                  f"{report.invalid} invalid" + (f"; problems by kind: {by_kind}" if by_kind else ""), highlight=False)
    console.print(f"OpenAI format checks ({len(OPENAI_CHECKS)}): {openai}", highlight=False)
    if skip_invalid:
        if not report.valid:
            raise TailorError(f"no valid records to write to {output}")
        written = write_valid(report, output)
        console.print(f"[green]wrote[/] {written} valid records to {output}; dropped {report.invalid} invalid",
                      highlight=False)
    elif report.problems:
        raise typer.Exit(1)


def token_limit(config, root: Path) -> int:
    """data.max_tokens where tailor.yaml sets it, else the base model's context length, so that a record longer
    than the model can read never passes. Only the model's config.json is read, no weights."""
    if "max_tokens" in config.data.model_fields_set:
        return config.data.max_tokens
    from transformers import AutoConfig

    from tailor.models.base import resolve_base_model

    model_ref = resolve_base_model(config.base_model, root=root)
    try:
        model_config = AutoConfig.from_pretrained(model_ref)
    except (OSError, ValueError) as exc:
        raise TailorError(f"base_model: cannot read the config of '{model_ref}' ({str(exc).splitlines()[0]}); "
                          "give --max-tokens or data.max_tokens") from None
    context = getattr(model_config, "max_position_embeddings", None)
    if not context:
        raise TailorError(f"base_model: '{model_ref}' does not say its context length (max_position_embeddings); "
                          "give --max-tokens or data.max_tokens")
    return int(context)


def _token_counter(tokenizer: Path | None, config, root: Path):
    from tailor.models.base import load_tokenizer, resolve_base_model
    from tailor.train.examples import count_chat_tokens

    loaded = load_tokenizer(str(tokenizer) if tokenizer else resolve_base_model(config.base_model, root=root))
    return lambda messages: count_chat_tokens(loaded, messages)


def check_training_data(train_file: Path, shown: int = 3) -> None:
    """Refuse to train on data the validator rejects: a format error found after the model loaded costs minutes."""
    from tailor.data.validate import validate_files

    if not train_file.is_file():
        return  # the training core names the missing file and how to build it
    # an empty file is the method's to judge: rag and continued pre-training, for instance, train on no records
    problems = [problem for problem in validate_files([train_file]).problems if problem.kind != "empty_file"]
    if problems:
        listed = "\n  ".join(str(problem) for problem in problems[:shown])
        more = f"\n  … and {len(problems) - shown} more" if len(problems) > shown else ""
        raise TailorError(f"{train_file}: {len(problems)} problem(s) in the training data; nothing was "
                          f"trained. Fix them, or keep the valid records with `tailor data validate {train_file} "
                          f"--skip-invalid -o FILE`:\n  {listed}{more}")


def train(overrides: list[str] = OverridesArgument, workspace: Path = WorkspaceOption, run: Path = RunOption,
          method: str = typer.Option(None, "--method", "-m", help="Method name (overrides train.method)."),
          resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint."),
          no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar.")) -> None:
    """Customize the base model on RUN/data with the configured method (LoRA by default)."""
    from tailor.methods import registry
    from tailor.methods.artifacts import artifact_dir
    from tailor.train.run import BuildResult, run_training

    overrides = list(overrides or []) + ([f"train.method={method}"] if method else [])
    config, root = open_workspace(workspace, overrides)
    run_dir = run_folder(root, run)
    check_training_data(run_dir / "data" / "train.jsonl")
    result = run_training(config, root, run_dir, resume=resume, show_progress=not no_progress)
    if isinstance(result, BuildResult):
        console.print(f"[green]built[/] {result.method} from {result.examples} training examples in "
                      f"{result.seconds:.1f} s (nothing trained) → {result.artifact}")
        return
    eval_text = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    console.print(f"[green]trained[/] {config.train.method}: {result.steps} steps in {result.seconds:.0f} s, "
                  f"train loss {result.train_loss:.4f}{eval_text}, {result.tokens_per_s:,.0f} tokens/s → "
                  f"{artifact_dir(run_dir, registry.get(config.train.method))}")


def evaluate(overrides: list[str] = OverridesArgument, workspace: Path = WorkspaceOption, run: Path = RunOption,
             fail_under: list[str] = typer.Option(None, "--fail-under", metavar="METRIC=VALUE", help=(
                 "Exit 1 when the customized model scores below VALUE on a higher-is-better metric of report.json "
                 "(token_f1, exact_match, rouge_l, bleu, adherence, rule.NAME, classification.SET.accuracy|"
                 "macro_f1|roc_auc, judge.mean_score|win_rate, forgetting.accuracy); MODEL.METRIC=VALUE names the "
                 "model, e.g. base.token_f1=0.2. Repeatable.")),
             # Annotated, so that a direct call (tests, other commands) gets None rather than the OptionInfo
             fail_over: Annotated[list[str] | None, typer.Option("--fail-over", metavar="METRIC=VALUE", help=(
                 "Exit 1 when a lower-is-better metric is above VALUE (eval_loss, perplexity, judge.loss_rate, "
                 "bias.output_divergence|changed_rate|score_gap|max_score_gap, forgetting.drop). "
                 "Repeatable."))] = None,
             no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar.")) -> None:
    """Models side by side (base and customized, or eval.models) on the held-out questions: token F1, exact match,
    ROUGE-L, BLEU, eval loss, perplexity, eval.rules adherence; classification sets, judge, probes when configured
    → RUN/eval/report.json and report.html."""
    from tailor.cli.common import err_console
    from tailor.evaluate.gates import failed_gates, parse_gates
    from tailor.evaluate.harness import plan_eval, report_table, run_eval
    from tailor.evaluate.report import REPORT_HTML
    from tailor.methods.artifacts import trained_method

    config, root = open_workspace(workspace, overrides)
    run_dir = run_folder(root, run)
    # before any model loads: eval files, model folders, endpoints and a typo in a CI gate are checked first
    plan = plan_eval(config, root, run_dir)
    names = [spec.name for spec in plan.specs]
    if not config.eval.models and trained_method(config, run_dir) not in names:  # not trained yet: gate fails later
        names.append(trained_method(config, run_dir))
    gates = parse_gates(list(fail_under or []), list(fail_over or []), models=names,
                        customized=plan.customized if config.eval.models else trained_method(config, run_dir),
                        eval_config=config.eval)
    report = run_eval(config, root, run_dir, show_progress=not no_progress, plan=plan)
    console.print(report_table(report))
    # soft_wrap: a path cut across lines cannot be copied
    console.print(f"report: {run_dir / 'eval' / 'report.json'}", soft_wrap=True, highlight=False)
    console.print(f"html report: {run_dir / 'eval' / REPORT_HTML}", soft_wrap=True, highlight=False)
    failures = failed_gates(report, gates, config.eval)
    for gate, line in failures:
        err_console.print(f"[bold red]{gate.option}:[/] {line}", highlight=False, soft_wrap=True)
    if failures:
        raise typer.Exit(1)
    if gates:
        console.print(f"[green]gates passed[/] ({', '.join(str(gate) for gate in gates)})", highlight=False)


def methods(workspace: Path = WorkspaceOption,
            count: bool = typer.Option(True, "--count/--no-count",
                                       help="Count trainable parameters on the configured base model.")) -> None:
    """List the customization methods, cheapest first, with their trainable-parameter counts."""
    from tailor.methods import registry

    config, root = open_workspace(workspace, [], required=False)
    table = Table(title="Customization methods")
    table.add_column("method")
    table.add_column("trainable parameters", justify="right")
    table.add_column("summary")
    model_ref = None
    if count:
        from tailor.models.base import resolve_base_model

        model_ref = resolve_base_model(config.base_model, root=root)
    for name in registry.names():
        method = registry.get(name)
        params, summary = ("-" if method.trains else "0"), method.summary
        if model_ref is not None and method.prepare is not None:
            import torch

            from tailor.errors import TailorError
            from tailor.methods.artifacts import load_for_training

            try:  # the same loading and preparation as `tailor train`, with the configured options
                prepared = load_for_training(config, model_ref, torch.float32, name=name)
                params = f"{sum(p.numel() for p in prepared.parameters() if p.requires_grad):,}"
            except TailorError as exc:  # e.g. QLoRA configured on a machine without CUDA: list it, say why
                summary = f"{summary} [yellow]({exc})[/]"
        table.add_row(name, params, summary)
    console.print(table)
