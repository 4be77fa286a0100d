"""The `tailor` command: assembles the command modules and turns user errors into one clear line."""

from __future__ import annotations

import sys

import typer

from tailor.cli import data as data_commands  # noqa: F401 - registers `data synth` and `data inspect`
from tailor.cli import demo, export, improve, init, models, retrieval, serving, stages, tune
from tailor.cli.ab import ab_app
from tailor.cli.alignment import feedback_app, reward_app
from tailor.cli.common import TailorGroup, err_console
from tailor.cli.compare import compare as compare_command
from tailor.cli.estimate import estimate as estimate_command
from tailor.cli.keys import keys_app
from tailor.cli.monitor import monitor_app
from tailor.cli.prune import prune as prune_command
from tailor.errors import TailorError

app = typer.Typer(help="Customize a pretrained language model for a domain: documents in, a served chatbot out.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  cls=TailorGroup)
app.command()(init.init)
app.command()(stages.ingest)
app.command()(retrieval.index)
app.command()(retrieval.search)
app.add_typer(stages.data_app, name="data")
app.command()(stages.train)
app.command("eval")(stages.evaluate)
app.command()(tune.tune)
app.command()(stages.methods)
app.command("compare")(compare_command)
app.command()(serving.chat)
app.command()(serving.serve)
app.command()(demo.demo)
app.add_typer(models.models_app, name="models")
app.add_typer(keys_app, name="keys")
app.add_typer(ab_app, name="ab")
app.add_typer(feedback_app, name="feedback")
feedback_app.command("queue")(improve.queue)
feedback_app.command("review")(improve.review)
app.command("improve")(improve.improve)
app.add_typer(monitor_app, name="monitor")
app.add_typer(reward_app, name="reward")
app.command("export")(export.export)
app.command("estimate")(estimate_command)
app.command("prune")(prune_command)


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, deprecation notices) drowns our own progress; keep errors only."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main() -> None:
    _quiet_libraries()
    # click handles usage errors itself (exit 2); user errors from the stages arrive here as TailorError
    try:
        app()
    except TailorError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
