"""`tailor serve --registry`: a running server on the tiny model follows the registry. Promoting v1 serves v1's
answers under the model's name, promoting v2 swaps to v2, a rollback brings v1 back, all without a restart; a
corrupted artifact is refused and the name keeps serving what it served."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest
import torch

from tailor.config import ServeConfig, validate_config
from tailor.errors import TailorError
from tailor.registry import Registry
from tailor.serve.engine import Engine
from tailor.serve.registry_watch import RegistryWatcher
from tailor.workspace import update_manifest

QUESTION = [{"role": "user", "content": "Where do I renew a parking permit?"}]


def make_run(folder, model_dir, seed):
    """A run folder as `tailor train` leaves it, with a LoRA adapter whose B matrices are random (so every version
    answers differently) instead of two training steps: registering reads only these files."""
    import peft
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed)
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=1.0)
    model.save_pretrained(folder / "adapter")
    config = validate_config({"base_model": model_dir})
    update_manifest(folder, "train", config=config.model_dump(mode="json"),
                    metrics={"train_loss": 1.0, "tokens": 100, "seconds": 1.0},
                    extra={"method": "lora", "base_model": model_dir})
    return folder


@pytest.fixture(scope="module")
def versions(tiny_model_dir, tmp_path_factory):
    return [make_run(tmp_path_factory.mktemp(f"run{seed}"), tiny_model_dir, seed) for seed in (1, 2)]


@pytest.fixture(scope="module")
def expected(tiny_model_dir, versions):
    """Each version's greedy answer from an engine that loads its adapter directly."""
    engine = Engine(tiny_model_dir, adapters={"v1": str(versions[0] / "adapter"), "v2": str(versions[1] / "adapter")},
                    dtype=torch.float32, max_new_tokens=8)
    answers = {name: engine.stream(name, QUESTION, temperature=0.0).text() for name in ("base", "v1", "v2")}
    engine.shutdown()
    assert len(set(answers.values())) == 3  # the test can tell the versions apart
    return answers


@pytest.fixture
def served(tiny_model_dir):
    from tests.unit.helpers import start_server

    engine = Engine(tiny_model_dir, dtype=torch.float32, max_new_tokens=8)
    # no response cache: it keys answers by model name, so after a swap it would replay the old version's answers
    # (reported to the serving engineers; the registry swap itself is what this test checks)
    server, url = start_server(engine, config=ServeConfig(feedback_db=":memory:", request_log=None, cache_size=0))
    yield engine, url
    server.should_exit = True
    engine.shutdown()


def ask(url, model="city"):
    response = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                          json={"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 8})
    return response.status_code, (response.json()["choices"][0]["message"]["content"]
                                  if response.status_code == 200 else response.json()["error"]["message"])


def wait_for(url, answer, seconds=20.0):
    deadline = time.monotonic() + seconds
    while (found := ask(url)) != (200, answer):
        assert time.monotonic() < deadline, f"still answering {found!r}, expected {answer!r}"
        time.sleep(0.1)


def test_promote_and_rollback_without_restart(served, versions, expected, tmp_path):
    engine, url = served
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    for run in versions:
        registry.register_run(run, "city")
    watcher = RegistryWatcher(engine, registry, interval=0.1).start()
    try:
        assert ask(url)[0] == 404  # registered, but nothing in production yet
        registry.promote("city", 1, "production")
        wait_for(url, expected["v1"])
        registry.promote("city", 2, "production")
        wait_for(url, expected["v2"])
        registry.rollback("city")
        wait_for(url, expected["v1"])
        assert ask(url, "base") == (200, expected["base"])  # the base model is untouched throughout
        assert watcher.served["city"].version == 1
        registry.promote("city", 1, "archived")  # withdrawn: the name disappears
        deadline = time.monotonic() + 20
        while ask(url)[0] != 404:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        watcher.stop()
    actions = [(c.version.version, c.action, c.to_stage) for c in registry.history("city")]
    assert actions == [(1, "register", "candidate"), (2, "register", "candidate"), (1, "promote", "production"),
                       (1, "demote", "archived"), (2, "promote", "production"), (2, "rollback", "archived"),
                       (1, "rollback", "production"), (1, "promote", "archived")]  # the audit log has every change


def test_a_corrupted_artifact_keeps_the_served_version(served, versions, expected, tmp_path):
    engine, url = served
    runs = [shutil.copytree(run, tmp_path / run.name) for run in versions]
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    for run in runs:
        registry.register_run(run, "city")
    watcher = RegistryWatcher(engine, registry, interval=60)  # synced by hand: no timing in this test
    registry.promote("city", 1, "production")
    assert watcher.sync().loaded == ["city@1"] and ask(url) == (200, expected["v1"])
    registry.promote("city", 2, "production")
    weights = runs[1] / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # corrupted after it went to production
    result = watcher.sync()
    assert result.loaded == [] and len(result.problems) == 1
    assert f"checksum mismatch for {weights}" in result.problems[0] and "still serving city@1" in result.problems[0]
    assert ask(url) == (200, expected["v1"])
    assert watcher.sync().problems == []  # reported once, not on every poll
    with pytest.raises(TailorError, match="city has no version 7"):  # bad input to the registry changes nothing
        registry.promote("city", 7, "production")
    assert watcher.sync().loaded == [] and ask(url) == (200, expected["v1"])


def test_cli_serve_has_the_registry_flag():
    import typer.testing

    from tailor.cli.app import app

    result = typer.testing.CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--registry" in result.output
