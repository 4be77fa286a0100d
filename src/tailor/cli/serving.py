"""Serving commands: `tailor serve` (API + chat page) and `tailor chat` (terminal)."""

from __future__ import annotations

from pathlib import Path

import typer

from tailor.cli.common import OverridesArgument, RunOption, WorkspaceOption, console, open_workspace, run_folder
from tailor.config import TailorConfig
from tailor.errors import TailorError


def _artifact_method(config: TailorConfig, run_dir: Path, folder: Path, artifact: str) -> str:
    """The method that wrote `folder`: the run's last trained method when it writes this kind of artifact, else the
    method in the config saved beside the artifact (a run may hold a prompt profile and an adapter)."""
    import yaml

    from tailor.methods.artifacts import run_method

    method = run_method(config, run_dir)
    if method.artifact == artifact:
        return method.name
    saved = folder / "tailor.yaml"
    saved_config = yaml.safe_load(saved.read_text()) if saved.is_file() else {}
    return (saved_config or {}).get("train", {}).get("method") or artifact


def run_adapters(config: TailorConfig, run_dir: Path) -> dict[str, str]:
    """The run's customized models (its adapter or whole model, its rag settings), served under the method's name
    next to the base model."""
    from tailor.methods.artifacts import run_method
    from tailor.methods.kinds import ADAPTER, MODEL, RAG

    served = {}
    # the run's own kind last: it wins a name two folders share, and it is chat's default (the last name)
    trained = run_method(config, run_dir).artifact
    for kind in sorted((RAG, ADAPTER, MODEL), key=lambda kind: kind.name == trained):
        folder = kind.in_run(run_dir)
        if kind.holds(folder):
            served[_artifact_method(config, run_dir, folder, kind.name)] = str(folder)
    return served


def run_profiles(config: TailorConfig, run_dir: Path) -> dict:
    """The run's prompt profile, served under the method's name: the base model with the profile applied."""
    from tailor.methods.kinds import PROMPT
    from tailor.methods.prompt import load_profile

    folder = PROMPT.in_run(run_dir)
    if not PROMPT.holds(folder):
        return {}
    return {_artifact_method(config, run_dir, folder, "prompt"): load_profile(folder)}


def configured_adapters(config: TailorConfig, root: Path, taken: dict[str, str]) -> dict[str, str]:
    """`serve.adapters` as served name -> absolute folder, checked before any model loads: each folder exists and
    holds something the engine serves, and no name shadows another served name (`taken`: name -> what it is)."""
    from tailor.methods.kinds import serving_kind

    folders = {}
    for name, path in config.serve.adapters.items():
        key = f"serve.adapters.{name}"
        if name in taken:
            raise TailorError(f"{key}: the name '{name}' is taken by {taken[name]}; pick another name")
        folder = Path(path) if Path(path).is_absolute() else Path(root) / path
        if not folder.is_dir():
            raise TailorError(f"{key}: {folder} does not exist (a folder, relative to the workspace)")
        serving_kind(folder, key)
        folders[name] = str(folder)
    return folders


def build_engine(config: TailorConfig, root: Path, run_dir: Path | None):
    from tailor.models.base import resolve_base_model
    from tailor.serve.engine import Engine

    adapters = run_adapters(config, run_dir) if run_dir is not None else {}
    profiles = run_profiles(config, run_dir) if run_dir is not None else {}
    # the engine would silently replace a served name, so a clash is refused here, before the model loads
    taken = {"base": "the base model", **dict.fromkeys(adapters, "the run's customization"),
             **dict.fromkeys(profiles, "the run's prompt profile"),
             **dict.fromkeys(config.serve.aliases, "an A/B alias (serve.aliases)")}
    # listed first, so the run's own customization stays the last name (`tailor chat`'s default)
    adapters = {**configured_adapters(config, root, taken), **adapters}
    serve_config = config.serve
    if serve_config.engine != "tailor":
        from tailor.serve.external import create_engine

        if serve_config.quantize != "none":
            raise TailorError(f"serve.quantize: {serve_config.quantize} is for serve.engine tailor; the "
                              f"{serve_config.engine} engine quantizes its own way (a GGUF's format for llama_cpp)")

        base = config.base_model if serve_config.engine == "llama_cpp" else resolve_base_model(config.base_model,
                                                                                               root=root)
        return create_engine(serve_config.engine, base, adapters=adapters, max_new_tokens=serve_config.max_new_tokens,
                             system_prompt=config.system_prompt, max_batch_size=serve_config.max_batch_size)
    return Engine(resolve_base_model(config.base_model, root=root), adapters=adapters, profiles=profiles,
                  dtype=config.train.dtype, max_new_tokens=serve_config.max_new_tokens,
                  system_prompt=config.system_prompt, max_batch_size=serve_config.max_batch_size,
                  max_queue=serve_config.max_queue, request_timeout=serve_config.request_timeout,
                  speculative_tokens=serve_config.speculative_tokens, answer_sentences=config.sentence_limit(),
                  quantize=serve_config.quantize)


def serve(overrides: list[str] = OverridesArgument, run: Path = RunOption, workspace: Path = WorkspaceOption,
          host: str = typer.Option(None, "--host", help="Interface (default: serve.host, 127.0.0.1)."),
          port: int = typer.Option(None, "--port", "-p", help="Port (default: serve.port, 8000)."),
          registry: bool = typer.Option(False, "--registry", help="Also serve every registered model name as its "
                                        "production version, following promotions and rollbacks live (on by "
                                        "default when registry.url is set)."),
          api_key_file: Path = typer.Option(None, "--api-key-file", help=(
              "Hashed API keys (`tailor keys create`); required to listen beyond 127.0.0.1 "
              "(default: serve.api_key_file)."))) -> None:
    """Serve the base model and the run's customized model: OpenAI-compatible API, a chat page at / and the
    operations console at /admin."""
    from tailor.registry.store import REGISTRY_FILE, open_registry
    from tailor.serve.app import serve as run_server

    config, root = open_workspace(workspace, overrides, required=False)
    serve_config = config.serve
    if serve_config.pii_keep is None:  # what ingest kept as public stays public in answers
        serve_config = serve_config.model_copy(update={"pii_keep": config.ingest.pii_keep})
    if api_key_file is not None:
        serve_config = serve_config.model_copy(update={"api_key_file": str(api_key_file.resolve())})
    if serve_config.api_key_file:  # a missing or broken key file is reported before the model loads
        from tailor.serve.security import KeyStore

        KeyStore.load(root / serve_config.api_key_file)
    run_dir = run_folder(root, run)
    engine = build_engine(config, root, run_dir if run_dir.is_dir() else None)
    watcher = None
    if registry or config.registry.url:
        from tailor.serve.registry_watch import watch_registry

        watcher = watch_registry(engine, config, root)
    # the /admin console shows the workspace's registry when there is one (opening it would create the file)
    models = open_registry(config, root) if watcher is None and (root / REGISTRY_FILE).is_file() else None
    # completions, feedback and request logs belong to the run being served (the workspace when it has none)
    run_server(engine, host or serve_config.host, port or serve_config.port, config=serve_config, root=root,
               state_dir=run_dir if run_dir.is_dir() else root, watcher=watcher, registry=models)


def chat(overrides: list[str] = OverridesArgument, run: Path = RunOption, workspace: Path = WorkspaceOption,
         model: str = typer.Option(None, "--model", "-m", help="Model name (default: the customized one if any)."),
         max_tokens: int = typer.Option(None, "--max-tokens", help="Cap on tokens per answer.")) -> None:
    """Chat with the base or customized model in the terminal (empty line or Ctrl-D to quit)."""
    config, root = open_workspace(workspace, overrides, required=False)
    run_dir = run_folder(root, run)
    engine = build_engine(config, root, run_dir if run_dir.is_dir() else None)
    name = model or engine.model_names()[-1]
    if name not in engine.model_names():
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
