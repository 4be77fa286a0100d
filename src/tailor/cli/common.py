"""What every command shares: the console, workspace loading with dotted overrides, the run folder."""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

import typer
import typer.core
from rich.console import Console

from tailor.config import CONFIG_NAME, TailorConfig, load_config

console = Console()
err_console = Console(file=sys.stderr)

WorkspaceOption = typer.Option(Path("."), "--workspace", "-w", help="Folder holding tailor.yaml.")
RunOption = typer.Option(None, "--run", "-r", help="Run folder (default: WORKSPACE/run).")
OverridesArgument = typer.Argument(None, metavar="KEY=VALUE", show_default=False,
                                   help="Dotted overrides, e.g. train.learning_rate=1e-4.")


# Typer's type labels (`<int>`, `<list[path]>`) in the words click and most CLIs use
TYPE_WORDS = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "file": "FILE", "dir": "FOLDER"}


def value_label(param, typer_label: str | None) -> str | None:
    """What `--help` shows after a parameter: nothing after a flag (it takes no value), an option's metavar
    (METRIC=VALUE) as given, else Typer's label in plain words: `<int range>` INTEGER, `<list[path]>` PATH, choices
    as a|b. A label of a shape not known here is shown as Typer gives it."""
    if getattr(param, "is_flag", False):
        return ""
    if param.metavar:  # an argument's metavar is already its name in the help (KEY=VALUE)
        return param.metavar if param.param_type_name == "option" else ""
    found = re.fullmatch(r"<(?:list\[)?([^\]>]+)\]?>(?:\.\.\.)?", typer_label or "")
    if found is None:
        return typer_label
    kind = found.group(1).removesuffix(" range")
    return TYPE_WORDS.get(kind, kind if "|" in kind else kind.upper())


class TailorGroup(typer.core.TyperGroup):
    """The `tailor` command group: in its help and every subcommand's, an option shows the value it takes as click
    does (PATH, INTEGER, METRIC=VALUE) and a flag shows nothing, instead of Typer's Python types (`<bool>` after a
    flag reads as if it took a value; `<str>`, `<list[str]>` are noise). Typer has no setting for it: the label its
    help panel asks each parameter for (`display_type_rich`) is replaced on this app's parameter objects only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for command in _commands(self):
            # through get_params, so that --help, which click adds only when help is asked for, is relabelled too
            command.get_params = functools.partial(_plain_params, command.get_params)

    def get_params(self, ctx):
        return _plain_params(super().get_params, ctx)


def _plain_params(get_params, ctx) -> list:
    params = get_params(ctx)
    for param in params:
        typer_label = getattr(param, "display_type_rich", None)  # the Typer versions that print Python types
        if typer_label is not None and "display_type_rich" not in vars(param):
            param.display_type_rich = functools.partial(_plain_label, param, typer_label)
    return params


def _plain_label(param, typer_label, ctx) -> str | None:
    return value_label(param, typer_label(ctx=ctx))


def _commands(group):
    for command in group.commands.values():
        yield command
        if hasattr(command, "commands"):
            yield from _commands(command)


def open_workspace(workspace: Path, overrides: list[str] | None, *, required: bool = True
                   ) -> tuple[TailorConfig, Path]:
    """Load WORKSPACE/tailor.yaml with overrides; without one (and not required) use the defaults."""
    path = Path(workspace) / CONFIG_NAME
    if not path.is_file() and not required:
        config, _ = load_config(None, overrides or [])
        return config, Path(workspace).resolve()
    return load_config(path, overrides or [])


def run_folder(root: Path, run: Path | None) -> Path:
    return Path(run) if run is not None else Path(root) / "run"
