"""The model registry on tiny trained runs: lineage, stages, one production version per name, rollback from the
audit log, diffs, bad input that changes nothing, and corrupted artifacts caught by their checksums."""

import json
import shutil

import pytest
import torch

from tailor.config import validate_config
from tailor.errors import TailorError
from tailor.registry import Registry
from tailor.registry.diff import diff_versions
from tailor.train.run import run_training
from tailor.workspace import file_sha256, write_json, write_jsonl
from tests.unit.helpers import tailor

FACTS = [("When is the library open?", "Monday to Friday, 9 am to 7 pm."),
         ("How much is a parking permit?", "A parking permit costs $45 per year.")]


def chat(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def train_run(folder, model_dir, learning_rate, token_f1):
    write_jsonl(folder / "data" / "train.jsonl", [chat(*FACTS[i % 2]) for i in range(8)])
    config = validate_config({"base_model": model_dir, "methods": {"lora": {"r": 2, "alpha": 4}},
                              "train": {"max_steps": 2, "batch_size": 4, "learning_rate": learning_rate,
                                        "dtype": "fp32", "save_every": 0}})
    run_training(config, folder, folder, show_progress=False)
    # a stand-in for `tailor eval`: the registry only reads the report file
    write_json(folder / "eval" / "report.json", {"models": {"base": {"token_f1": 0.1}, "lora": {"token_f1": token_f1}},
                                                 "token_f1_gain": round(token_f1 - 0.1, 4)})
    return folder


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    torch.set_num_threads(1)
    return [train_run(tmp_path_factory.mktemp("run1"), tiny_model_dir, 1e-3, 0.3),
            train_run(tmp_path_factory.mktemp("run2"), tiny_model_dir, 2e-3, 0.5)]


@pytest.fixture
def registry(tmp_path):
    return Registry(f"sqlite:///{tmp_path / 'registry.db'}")


def stages(registry, name="city"):
    return {v.version: v.stage for v in registry.versions(name)}


def test_register_records_lineage(registry, runs):
    version = registry.register_run(runs[0], "city", by="ana")
    assert (version.version, version.stage, version.method) == (1, "candidate", "lora")
    assert version.config["train"]["learning_rate"] == 1e-3
    assert version.artifacts["adapter/adapter_model.safetensors"] == \
        file_sha256(runs[0] / "adapter" / "adapter_model.safetensors")
    assert file_sha256(runs[0] / "data" / "train.jsonl") in version.datasets.values()
    assert version.metrics["eval"]["lora"]["token_f1"] == 0.3 and "train_loss" in version.metrics["train"]
    assert version.code_version.startswith(("git:", "tailor "))
    second = registry.register_run(runs[1], "city", parent="city@1")
    assert second.version == 2 and second.parent_id == version.id
    [change] = registry.history(version_id=version.id)
    assert (change.action, change.from_stage, change.to_stage, change.changed_by) == \
        ("register", None, "candidate", "ana")


def test_promote_demote_rollback_and_audit_log(registry, runs):
    registry.register_run(runs[0], "city")
    registry.register_run(runs[1], "city")
    registry.promote("city", 1, "production", by="ana", reason="first release")
    assert registry.resolve("city@production").version == 1
    registry.promote("city", 2, "staging", by="ana")
    registry.promote("city", 2, "production", by="bo", reason="better F1")
    assert stages(registry) == {1: "archived", 2: "production"}  # one production version per name

    rolled_back, restored = registry.rollback("city", by="cy", reason="complaints")
    assert (rolled_back.version, restored.version) == (2, 1)
    assert stages(registry) == {1: "production", 2: "archived"}
    assert registry.resolve("city@production").version == 1 and registry.resolve("city").version == 2

    log = [(c.version.version, c.action, c.from_stage, c.to_stage, c.changed_by, c.reason)
           for c in registry.history("city")]
    assert log == [
        (1, "register", None, "candidate", log[0][4], ""),
        (2, "register", None, "candidate", log[1][4], ""),
        (1, "promote", "candidate", "production", "ana", "first release"),
        (2, "promote", "candidate", "staging", "ana", ""),
        (1, "demote", "production", "archived", "bo", "replaced in production by city@2: better F1"),
        (2, "promote", "staging", "production", "bo", "better F1"),
        (2, "rollback", "production", "archived", "cy", "complaints"),
        (1, "rollback", "archived", "production", "cy", "complaints"),
    ]
    with pytest.raises(TailorError, match="no earlier production version"):  # v1 was the first in production
        registry.rollback("city")


def test_bad_input_changes_nothing(registry, runs):
    registry.register_run(runs[0], "city")
    registry.promote("city", 1, "production")

    def snapshot():
        return stages(registry), len(registry.history("city"))

    before = snapshot()
    for call, message in [
        (lambda: registry.promote("city", 9, "production"), "city has no version 9 \\(versions: 1\\)"),
        (lambda: registry.promote("town", 1, "production"), "no model named 'town'"),
        (lambda: registry.promote("city", 1, "live"), "unknown stage 'live'"),
        (lambda: registry.promote("city", 1, "production"), "already in production"),
        (lambda: registry.promote("city", 1, "candidate"), "can go to archived \\(not candidate\\)"),
        (lambda: registry.rollback("city"), "no earlier production version"),
        (lambda: registry.register_run(runs[1], "city", parent="city@7"), "city has no version 7"),
        (lambda: registry.register_run(runs[1] / "data", "city"), "not a run folder"),
        (lambda: registry.register_run(runs[1], "city@2"), "--name 'city@2': use letters"),
    ]:
        with pytest.raises(TailorError, match=message):
            call()
        assert snapshot() == before
    assert [v.version for v in registry.versions("city")] == [1]


def test_checksum_mismatch_names_the_file(registry, runs, tmp_path):
    run = shutil.copytree(runs[0], tmp_path / "copy")
    registry.register_run(run, "city")
    assert registry.resolve("city@1", verify=True).version == 1
    weights = run / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(TailorError, match=f"checksum mismatch for {weights}"):
        registry.resolve("city@1", verify=True)
    weights.unlink()
    with pytest.raises(TailorError, match="is missing"):
        registry.resolve("city", verify=True)


def test_diff_shows_config_and_metric_changes(registry, runs):
    old, new = registry.register_run(runs[0], "city"), registry.register_run(runs[1], "city")
    result = diff_versions(old, new)
    assert ("train.learning_rate", 1e-3, 2e-3) in result.config
    assert all(not key.startswith("train.method") for key, _, _ in result.config)  # identical keys are left out
    metrics = {key: (a, b, delta) for key, a, b, delta in result.metrics}
    assert metrics["eval.lora.token_f1"] == (0.3, 0.5, pytest.approx(0.2))
    assert not any(key.startswith("datasets.") for key, _, _ in result.lineage)  # the same data in both runs


def test_cli_diff_and_clean_errors(runs, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    registry = Registry(f"sqlite:///{workspace / 'registry.db'}")
    registry.register_run(runs[0], "city")
    registry.register_run(runs[1], "city")
    def models(*args):
        return tailor("models", *args, "-w", workspace, columns=200)

    diff = models("diff", "city@1", "city@2")
    assert diff.returncode == 0, diff.stderr
    assert "train.learning_rate" in diff.stdout and "0.001" in diff.stdout and "0.002" in diff.stdout
    assert "eval.lora.token_f1" in diff.stdout and "+0.2" in diff.stdout
    before = json.dumps(stages(registry))
    bad = models("promote", "city", "9", "--stage", "production")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == "error: city has no version 9 (versions: 1, 2)"
    assert json.dumps(stages(registry)) == before


def test_promoting_or_rolling_back_onto_a_corrupted_artifact_changes_nothing(registry, runs, tmp_path):
    first, second = shutil.copytree(runs[0], tmp_path / "one"), shutil.copytree(runs[1], tmp_path / "two")
    registry.register_run(first, "city")
    registry.register_run(second, "city")
    registry.promote("city", 1, "production")
    registry.promote("city", 2, "production")
    weights = first / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # truncated after registration
    before = stages(registry), len(registry.history("city"))
    with pytest.raises(TailorError, match=f"city@1: checksum mismatch for {weights}"):
        registry.rollback("city")
    assert (stages(registry), len(registry.history("city"))) == before
    registry.register_run(first, "city")  # a fresh registration records the new checksums…
    (first / "adapter" / "adapter_config.json").write_text("{}")  # …and then v3's config is overwritten
    with pytest.raises(TailorError, match="city@3: checksum mismatch for .*adapter_config.json"):
        registry.promote("city", 3, "staging")
    registry.register_run(shutil.copytree(runs[1], tmp_path / "four"), "city")
    registry.promote("city", 4, "staging")  # an intact version still moves
    assert stages(registry) == {1: "archived", 2: "production", 3: "candidate", 4: "staging"}
