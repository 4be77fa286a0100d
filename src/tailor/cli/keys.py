"""`tailor keys`: create, list and revoke the API keys of `tailor serve` (stored hashed, shown once)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from tailor.cli.common import WorkspaceOption, console, open_workspace

keys_app = typer.Typer(help="API keys of `tailor serve`: stored as hashes, with scopes and rate limits.",
                       no_args_is_help=True)

FileOption = typer.Option(None, "--file", "-f", help="The key file (default: serve.api_key_file, else keys.json).")


def _key_file(workspace: Path, file: Path | None) -> Path:
    if file is not None:
        return file
    config, root = open_workspace(workspace, [], required=False)
    return root / (config.serve.api_key_file or "keys.json")


@keys_app.command("create")
def create(name: str = typer.Argument(..., help="A name for the key, shown in logs instead of the key."),
           scope: list[str] = typer.Option(["chat"], "--scope", "-s", help=(
               "chat, admin, or a role of the /admin console: viewer, reviewer, approver (repeatable).")),
           rate_limit: str = typer.Option(None, "--rate-limit", help="This key's limit, e.g. 600/minute."),
           file: Path = FileOption, workspace: Path = WorkspaceOption) -> None:
    """Create a key and print it once; only its SHA-256 hash is written to the file."""
    from tailor.serve.security import create_key

    path = _key_file(workspace, file)
    key = create_key(path, name, scope, rate_limit)
    console.print(f"key '{name}' ({', '.join(scope)}) added to {path}; copy it now, it is not stored:",
                  highlight=False)
    print(key)


@keys_app.command("list")
def list_keys(file: Path = FileOption, workspace: Path = WorkspaceOption) -> None:
    """The keys in the file: name, scopes, rate limit (never the keys)."""
    from tailor.serve.security import KeyStore

    table = Table("name", "scopes", "rate limit")
    for key in KeyStore.load(_key_file(workspace, file)).keys:
        table.add_row(key.name, ", ".join(key.scopes), key.rate_limit or "serve.rate_limit")
    console.print(table)


@keys_app.command("revoke")
def revoke(name: str = typer.Argument(..., help="The key's name."), file: Path = FileOption,
           workspace: Path = WorkspaceOption) -> None:
    """Remove a key; a running server refuses it from its next request on (it re-reads the file when it changes)."""
    from tailor.serve.security import revoke_key

    path = _key_file(workspace, file)
    revoke_key(path, name)
    console.print(f"key '{name}' removed from {path}", highlight=False)
