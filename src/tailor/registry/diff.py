"""Differences between two registered versions: lineage, resolved config (dotted keys) and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tailor.registry.tables import ModelVersion

MISSING = object()  # a key one side does not have, shown as "—"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"learning_rate": 1e-4}} → {"train.learning_rate": 1e-4}; lists stay values."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def changed(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every dotted key whose value differs, MISSING where a side lacks the key."""
    old_flat, new_flat = flatten(old), flatten(new)
    keys = sorted(set(old_flat) | set(new_flat))
    return [(key, old_flat.get(key, MISSING), new_flat.get(key, MISSING)) for key in keys
            if old_flat.get(key, MISSING) != new_flat.get(key, MISSING)]


@dataclass
class VersionDiff:
    old: ModelVersion
    new: ModelVersion
    lineage: list[tuple[str, Any, Any]] = field(default_factory=list)
    config: list[tuple[str, Any, Any]] = field(default_factory=list)
    # every metric either version has, changed or not: (key, old, new, new - old or None)
    metrics: list[tuple[str, Any, Any, float | None]] = field(default_factory=list)


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _lineage(version: ModelVersion, labels: dict[int, str]) -> dict[str, Any]:
    parent = None if version.parent_id is None else labels.get(version.parent_id, version.parent_id)
    return {"base_model": version.base_model, "method": version.method, "code_version": version.code_version,
            "datasets": version.datasets, "parent": parent}


def diff_versions(old: ModelVersion, new: ModelVersion, labels: dict[int, str] | None = None) -> VersionDiff:
    """`labels` maps version ids to "NAME@V", to show parents by name."""
    labels = labels or {}
    result = VersionDiff(old, new, lineage=changed(_lineage(old, labels), _lineage(new, labels)),
                         config=changed(old.config, new.config))
    old_metrics, new_metrics = flatten(old.metrics), flatten(new.metrics)
    for key in sorted(set(old_metrics) | set(new_metrics)):
        a, b = old_metrics.get(key, MISSING), new_metrics.get(key, MISSING)
        delta = b - a if _numeric(a) and _numeric(b) else None
        result.metrics.append((key, a, b, delta))
    return result
