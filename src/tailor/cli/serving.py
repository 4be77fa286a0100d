"""Serving commands: `tailor serve` (API + chat page) and `tailor chat` (terminal)."""

from __future__ import annotations

from pathlib import Path

import typer

from tailor.cli.common import RunOption, WorkspaceOption, console, open_workspace, run_folder
from tailor.config import TailorConfig


def run_adapters(config: TailorConfig, run_dir: Path) -> dict[str, str]:
    """The run's customized model, served under the method's name next to the base model."""
    from tailor.methods.artifacts import ADAPTER_DIR, trained_method

    adapter = Path(run_dir) / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        return {}
    return {trained_method(config, run_dir): str(adapter)}


def build_engine(config: TailorConfig, root: Path, run_dir: Path | None):
    from tailor.models.base import resolve_base_model
    from tailor.serve.engine import Engine

    adapters = run_adapters(config, run_dir) if run_dir is not None else {}
    return Engine(resolve_base_model(config.base_model, root=root), adapters=adapters,
                  dtype=config.train.dtype, max_new_tokens=config.serve.max_new_tokens,
                  system_prompt=config.system_prompt)


def serve(run: Path = RunOption, workspace: Path = WorkspaceOption,
          host: str = typer.Option(None, "--host", help="Interface (default: serve.host, 127.0.0.1)."),
          port: int = typer.Option(None, "--port", "-p", help="Port (default: serve.port, 8000).")) -> None:
    """Serve the base model and the run's customized model: OpenAI-compatible API and a chat page at /."""
    from tailor.serve.app import serve as run_server

    config, root = open_workspace(workspace, [], required=False)
    run_dir = run_folder(root, run)
    engine = build_engine(config, root, run_dir if run_dir.is_dir() else None)
    run_server(engine, host or config.serve.host, port or config.serve.port)


def chat(run: Path = RunOption, workspace: Path = WorkspaceOption,
         model: str = typer.Option(None, "--model", "-m", help="Model name (default: the customized one if any)."),
         max_tokens: int = typer.Option(None, "--max-tokens", help="Cap on tokens per answer.")) -> None:
    """Chat with the base or customized model in the terminal (empty line or Ctrl-D to quit)."""
    config, root = open_workspace(workspace, [], required=False)
    run_dir = run_folder(root, run)
    engine = build_engine(config, root, run_dir if run_dir.is_dir() else None)
    name = model or engine.model_names()[-1]
    if name not in engine.model_names():
        from tailor.errors import TailorError

        raise TailorError(f"--model: unknown model '{name}' (available: {', '.join(engine.model_names())})")
    console.print(f"chatting with [bold]{name}[/] (models: {', '.join(engine.model_names())}); empty line quits")
    messages: list[dict] = []  # the engine adds the workspace's system prompt
    while True:
        try:
            question = console.input("[bold cyan]you>[/] ").strip()
        except EOFError:
            break
        if not question:
            break
        messages.append({"role": "user", "content": question})
        console.print(f"[bold green]{name}>[/] ", end="")
        answer = ""
        for delta in engine.stream(name, messages, max_tokens=max_tokens, temperature=0.0):
            console.print(delta, end="", soft_wrap=True, highlight=False, markup=False)
            answer += delta
        console.print()
        messages.append({"role": "assistant", "content": answer})
