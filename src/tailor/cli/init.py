"""`tailor init`: a workspace folder with a commented tailor.yaml."""

from __future__ import annotations

from pathlib import Path

import typer
from pydantic import BaseModel

from tailor.cli.common import console
from tailor.config import CONFIG_NAME, TailorConfig
from tailor.errors import TailorError
from tailor.workspace import atomic_write_text


def _yaml_lines(model: type[BaseModel], values: dict, indent: int = 0) -> list[str]:
    import yaml

    lines = []
    pad = " " * indent
    for name, field in model.model_fields.items():
        value = values[name]
        lines.append(f"{pad}# {field.description}")
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"{pad}{name}:")
            lines += _yaml_lines(annotation, value, indent + 2)
        else:
            dumped = yaml.safe_dump({name: value}, default_flow_style=True, width=1000, allow_unicode=True).strip()
            lines.append(f"{pad}{dumped[1:-1]}")  # drop the flow mapping's own braces
    return lines


def render_config(config: TailorConfig) -> str:
    header = "# tailor workspace configuration. Every key is documented; `tailor <command> KEY=VALUE` overrides one.\n"
    return header + "\n".join(_yaml_lines(TailorConfig, config.model_dump(mode="json"))) + "\n"


def init(folder: Path = typer.Argument(Path("."), help="Workspace folder to create or fill."),
         force: bool = typer.Option(False, "--force", help="Overwrite an existing tailor.yaml.")) -> None:
    """Create a workspace: tailor.yaml with every key, its default and its meaning."""
    path = folder / CONFIG_NAME
    if path.exists() and not force:
        raise TailorError(f"{path}: already exists (use --force to overwrite)")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, render_config(TailorConfig()))
    console.print(f"[green]created[/] {path}. Next: add `sources` and `data.qa_files`, then "
                  f"`tailor ingest`, `tailor data build`, `tailor train`, `tailor eval`, `tailor serve`.")
