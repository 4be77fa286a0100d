"""What every command shares: the console, workspace loading with dotted overrides, the run folder."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from tailor.config import CONFIG_NAME, TailorConfig, load_config

console = Console()
err_console = Console(file=sys.stderr)

WorkspaceOption = typer.Option(Path("."), "--workspace", "-w", help="Folder holding tailor.yaml.")
RunOption = typer.Option(None, "--run", "-r", help="Run folder (default: WORKSPACE/run).")
OverridesArgument = typer.Argument(None, help="Dotted overrides, e.g. train.learning_rate=1e-4.", show_default=False)


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
