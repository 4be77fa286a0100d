"""The model registry: every registered run as a numbered version of a named model, with its lineage (base model,
dataset hashes, resolved config, code version, metrics, artifact checksums, parent) and its stage
(candidate → staging → production → archived), every stage change in an audit log."""

from tailor.registry.store import STAGES, Registry, open_registry, registry_url

__all__ = ["STAGES", "Registry", "open_registry", "registry_url"]
