"""What unit tests of several stages share (fixtures are in the conftest.py files): tiny chat records, the rollout
methods' rewards and prompts, a real server on a thread, and the `tailor` program in-process. Imported as
`from tests.unit.helpers import ...`."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import uvicorn

    from tailor.config import ServeConfig
    from tailor.serve.engine import Engine

# tiny chat records for the training and search tests
FACTS = [("When is the library open?", "Monday to Friday, 9 am to 7 pm."),
         ("How much is a parking permit?", "A parking permit costs $45 per year."),
         ("What is city hall's phone number?", "Call (555) 201-4400.")]


def chat(question, answer):
    return {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


# the rollout methods (ppo, grpo): rule-based rewards a workspace module provides, prompts answered yes or no, and how
# far a policy moved towards "Yes."
REWARDS = """
def says_yes(prompt, answer):
    return 1.0 if "yes" in answer.lower() else 0.0

def broken(prompt, answer):
    raise ValueError("no score today")

def not_a_number(prompt, answer):
    return "high"
"""
PROMPTS = [[{"role": "user", "content": f"Is topic {i} open?"}] for i in range(8)]


def yes_margin(model_dir, run_dir=None) -> float:
    """Mean log P("Yes.") − log P("No.") over the PROMPTS, under the base (or RUN/adapter on it): how far a policy
    moved towards the rule, measured without the noise of a few sampled answers."""
    import peft
    from transformers import AutoModelForCausalLM

    from tailor.models.base import load_tokenizer
    from tailor.train.examples import collate, tokenize_chat
    from tailor.train.loop import sequence_log_probs

    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    if run_dir is not None:
        model = peft.PeftModel.from_pretrained(model, str(run_dir / "adapter"))
    model.eval()
    rows = [tokenize_chat(tokenizer, [*prompt, {"role": "assistant", "content": answer}])
            for answer in ("Yes.", "No.") for prompt in PROMPTS]
    with torch.no_grad():
        values = sequence_log_probs(model, collate(rows, tokenizer.pad_token_id, torch.device("cpu")))
    return float(values[:len(PROMPTS)].mean() - values[len(PROMPTS):].mean())


def start_server(engine: Engine, host: str = "127.0.0.1", config: ServeConfig | None = None,
                 root=".", **app_options) -> tuple[uvicorn.Server, str]:
    """`tailor serve`'s app on a thread, on a free port: (the server, to stop with should_exit, and its URL).
    `app_options`: more arguments of create_app (e.g. the registry the /admin console shows)."""
    import uvicorn

    from tailor.serve.app import bind_socket, create_app

    sock = bind_socket(host, 0)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config, root, **app_options), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    return server, f"http://{host}:{sock.getsockname()[1]}"


# the `tailor` program in-process: what `python -m tailor.cli.app` does, minus the interpreter start (seconds per call)
@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def tailor(*args, cwd=".", input: str = "", columns: int = 80) -> Finished:
    """Run `tailor ARGS` in folder `cwd` through the program's own entry point (`tailor.cli.app.main`, which turns a
    user error into one line and an exit status), with `input` as standard input and a terminal `columns` wide; a
    subprocess proves nothing more here, and one test in tests/unit/cli/test_cli.py still runs the real program."""
    import io
    import os
    import sys
    import warnings
    from contextlib import redirect_stderr, redirect_stdout

    from transformers.utils import logging as hf_logging

    from tailor.cli import common
    from tailor.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    # rich's consoles keep their own file and width (None: follow sys.stdout, the terminal): restored as they were
    consoles = [(console, console._file, console._width) for console in (common.console, common.err_console)]
    previous = (os.getcwd(), sys.argv, sys.stdin, hf_logging.get_verbosity())
    os.chdir(cwd)
    sys.argv, sys.stdin = ["tailor", *map(str, args)], io.StringIO(input)
    common.console.file, common.err_console.file = out, err
    common.console.width = common.err_console.width = columns
    try:
        with warnings.catch_warnings(), redirect_stdout(out), redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(previous[0])
        sys.argv, sys.stdin = previous[1:3]
        hf_logging.set_verbosity(previous[3])
        for console, file, width in consoles:
            console._file, console._width = file, width
    return Finished(code, out.getvalue(), err.getvalue())


def wait_until_healthy(url: str, server=None, timeout: float = 120) -> None:
    """Poll URL/health until it answers 200; `server` (a subprocess.Popen) must not exit meanwhile (its stderr, when
    piped, goes into the failure)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if server is not None and server.poll() is not None:
            stderr = server.stderr.read()[-3000:] if server.stderr else ""
            raise AssertionError(f"the server exited with status {server.returncode}: {stderr}")
        assert time.monotonic() < deadline, f"{url} did not answer /health within {timeout:.0f} s"
        time.sleep(0.2)


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) as a module, e.g. load_benchmark("loop") for benchmarks/loop.py."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses of the script look their module up there
    spec.loader.exec_module(module)
    return module
