"""Artifact kinds (methods/kinds.py): one definition per kind, asked by eval, serve, export and the registry."""

import pytest

from tailor.cli.serving import configured_adapters
from tailor.config import validate_config
from tailor.errors import TailorError
from tailor.methods.kinds import ADAPTER, KINDS, MODEL, PROMPT, RAG, REWARD, kind_of, run_artifact_files, serving_kind
from tailor.registry.lineage import artifact_checksums


def folder_with(tmp_path, name, *markers):
    folder = tmp_path / name
    folder.mkdir()
    for marker in markers:
        (folder / marker).write_text("{}")
    return folder


@pytest.mark.parametrize(("markers", "expected"), [
    (["adapter_config.json"], ADAPTER),
    (["adapter_config.json", "retrieval.json"], ADAPTER),  # raft: an adapter answering from passages
    (["adapter_config.json", "reward.json", "head.safetensors"], REWARD),  # a reward folder is a PEFT folder too
    (["profile.json", "retrieval.json"], PROMPT),
    (["config.json"], MODEL),
    (["retrieval.json"], RAG),
    ([], None),
])
def test_a_folder_is_recognised_by_the_first_kind_whose_marker_it_holds(markers, expected, tmp_path):
    assert kind_of(folder_with(tmp_path, "artifact", *markers)) is expected


def test_serving_refuses_what_is_not_a_chat_model_naming_the_key(tmp_path):
    reward = folder_with(tmp_path, "reward", "adapter_config.json", "reward.json")
    with pytest.raises(TailorError, match=r"serve\.adapters\.judge: .*reward holds a reward model .* not served"):
        serving_kind(reward, "serve.adapters.judge")
    empty = folder_with(tmp_path, "empty")
    with pytest.raises(TailorError, match=r"is not a PEFT adapter folder \(adapter_config.json\), .* or a rag folder"):
        serving_kind(empty, "serve.adapters.x")
    config = validate_config({"serve": {"adapters": {"judge": str(reward)}}})
    with pytest.raises(TailorError, match="serve.adapters.judge: .* not served as a chat model"):
        configured_adapters(config, tmp_path, {})


def test_the_registry_checksums_every_kind_and_skips_half_written_files(tmp_path):
    for kind in KINDS.values():
        if kind.folder:
            folder = folder_with(tmp_path, kind.folder, kind.marker)
            (folder / ".tmp-partial").write_text("half")
    (tmp_path / "prompt_table.safetensors").write_bytes(b"rows")
    (tmp_path / "prompt_table.json").write_text("{}")
    (tmp_path / "corpus.jsonl").write_text("data, not an artifact")
    files = {path.relative_to(tmp_path).as_posix() for path in run_artifact_files(tmp_path)}
    assert files == {f"{kind.folder}/{kind.marker}" for kind in KINDS.values() if kind.folder} | {
        "prompt_table.safetensors", "prompt_table.json"}
    assert set(artifact_checksums(tmp_path)) == files
