"""What a run folder says about where its model came from, read from the files the stages wrote: manifest.json
(resolved config, method, base model, hashed inputs, training metrics), eval/report.json, and the artifact files."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import tailor
from tailor.errors import TailorError
from tailor.workspace import MANIFEST, file_sha256, read_json


@dataclass
class Lineage:
    run_dir: Path
    method: str
    base_model: str
    config: dict[str, Any]
    datasets: dict[str, str]
    code_version: str
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)


def code_version() -> str:
    """The git commit of the tailor source when it runs from a checkout, else the installed package version.

    Taken when the run is registered: manifest.json records package versions, not commits.
    """
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(tailor.__file__).parent, capture_output=True,
                                text=True, timeout=5)
        if result.returncode == 0 and result.stdout.strip():
            return f"git:{result.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"tailor {metadata.version('tailor')}"
    except metadata.PackageNotFoundError:
        return "tailor (unknown version)"


def artifact_checksums(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of the run's artifacts (every kind in tailor.methods.kinds), keyed by path relative to
    the run. A rag folder holds the retrieval settings; the index it names is data, like the corpus, and is not
    copied into the registry."""
    from tailor.methods.kinds import run_artifact_files

    return {path.relative_to(run_dir).as_posix(): file_sha256(path) for path in run_artifact_files(run_dir)}


def _relative_to(path: str, run_dir: Path) -> str:
    """Files inside the run folder by their place in it (data/train.jsonl), so two runs on the same data compare
    equal; anything else as recorded.

    manifest.json keeps paths as the command saw them, relative to the folder it ran in (run/data/train.jsonl), so
    a relative path is matched by its longest tail that names a file in the run folder.
    """
    recorded = Path(path)
    if recorded.is_absolute():
        resolved = recorded.resolve()
        return resolved.relative_to(run_dir).as_posix() if resolved.is_relative_to(run_dir) else path
    for start in range(len(recorded.parts)):
        tail = Path(*recorded.parts[start:])
        if (run_dir / tail).is_file():
            return tail.as_posix()
    return path


def read_lineage(run_dir: Path | str) -> Lineage:
    run_dir = Path(run_dir).resolve()
    manifest_path = run_dir / MANIFEST
    if not manifest_path.is_file():
        raise TailorError(f"{run_dir}: not a run folder (no {MANIFEST}); train a model there first")
    manifest = read_json(manifest_path)
    stages = manifest.get("stages", {})
    trained = stages.get("train")
    if not trained or "config" not in manifest:
        raise TailorError(f"{manifest_path}: no finished training recorded; run `tailor train` first")
    artifacts = artifact_checksums(run_dir)
    if not artifacts:
        raise TailorError(f"{run_dir}: no model artifact (adapter/, model/, prompt/ or rag/) to register")
    datasets: dict[str, str] = {}
    for stage in stages.values():  # every hashed input of every stage: the Q/A files, train.jsonl, eval.jsonl, …
        datasets.update({_relative_to(path, run_dir): digest for path, digest in stage.get("inputs", {}).items()})
    metrics: dict[str, Any] = {}
    if trained.get("metrics"):
        metrics["train"] = trained["metrics"]
    report_path = run_dir / "eval" / "report.json"
    if report_path.is_file():
        report = read_json(report_path)
        metrics["eval"] = report.get("models", {})
        if "token_f1_gain" in report:
            metrics["token_f1_gain"] = report["token_f1_gain"]
    config = manifest["config"]
    return Lineage(run_dir=run_dir, method=trained.get("method") or config.get("train", {}).get("method", "?"),
                   base_model=trained.get("base_model") or config.get("base_model", "?"), config=config,
                   datasets=datasets, code_version=code_version(), metrics=metrics, artifacts=artifacts)
