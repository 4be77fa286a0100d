"""Serve what the registry says is in production: a background thread polls the registry and keeps, for every
registered model name, the engine's model of that name on the artifact of its production version (a PEFT
adapter, a whole model or a prompt profile).

A promotion or a rollback is therefore live within one poll interval, without restarting the server: the watcher
calls `engine.add_adapter(name, folder)` (which swaps an existing name between two decoding steps) or
`engine.remove_adapter(name)` when a name no longer has a production version. Before an artifact is loaded its
files are checked against the checksums recorded at registration; a corrupted or missing file is logged and the
name keeps serving what it served before, so a bad artifact never replaces a good one.

A canary (`tailor improve`, `Registry.start_canary`) is followed the same way: its candidate is loaded under its
label (city@4) and the alias router sends the canary's share of the users asking for `city` to it (a share changed
while it runs, at the next poll); when the canary ends, the label is unloaded and the split removed. Without an alias
router (`aliases`), canaries are not served.

Polling, not notifications: the registry is any SQLAlchemy database (SQLite by default), and a SELECT every few
seconds is the one change signal all of them share.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tailor.errors import TailorError
from tailor.registry import Registry
from tailor.registry.store import verify_artifacts
from tailor.registry.tables import ModelVersion
from tailor.serve.ab import AliasRouter
from tailor.serve.protocol import ServingEngine

log = logging.getLogger(__name__)


@dataclass
class Served:
    """What the engine serves under a registered name."""

    version: int
    version_id: int
    folder: str


@dataclass
class SyncResult:
    loaded: list[str] = field(default_factory=list)  # "city@2"
    removed: list[str] = field(default_factory=list)  # "city"
    problems: list[str] = field(default_factory=list)  # one line each, also logged


def artifact_folder(version: ModelVersion) -> Path | None:
    """The folder a version is served from: the artifact of its method's kind, else the first it recorded of a kind
    the engine serves (PEFT adapter, whole model, prompt profile, rag settings); None when it recorded none."""
    from tailor.methods import registry
    from tailor.methods.kinds import KINDS

    own = registry.get(version.method).artifact if version.method in registry.names() else None
    for kind in sorted(KINDS.values(), key=lambda kind: kind.name != own):
        if kind.folder and kind.load_for_serving is not None and any(
                path.startswith(f"{kind.folder}/") for path in version.artifacts):
            return kind.in_run(version.run_dir)
    return None


class RegistryWatcher:
    def __init__(self, engine: ServingEngine, registry: Registry, *, interval: float = 2.0,
                 names: list[str] | None = None):
        # every engine swaps names through add_adapter/remove_adapter; one that cannot load a kind of artifact
        # (llama.cpp: none at runtime) raises there, and that version is reported as not servable
        self.engine = engine
        self.registry = registry
        self.interval = interval
        self.names = names  # None: every name in the registry
        self.aliases: AliasRouter | None = None  # set by the app that serves the engine (canaries need it)
        self.canaries: dict[str, str] = {}  # model name → the candidate label served beside it
        self._shares: dict[str, float] = {}  # model name → the share of its users the canary gets now
        self.served: dict[str, Served] = {}
        self._refused: dict[str, int] = {}  # name → version id already reported as not servable
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sync(self) -> SyncResult:
        """One poll: bring the engine in line with the registry's production versions."""
        result = SyncResult()
        try:
            names = self.names if self.names is not None else self.registry.names()
            production = {}
            for name in names:
                in_production = [v for v in self.registry.versions(name) if v.stage == "production"]
                if in_production:
                    production[name] = in_production[-1]
        except Exception as exc:  # noqa: BLE001 - a database that is briefly unreachable must not end the thread
            result.problems.append(f"registry {self.registry.url}: {str(exc).splitlines()[0]}")
            log.warning(result.problems[-1])
            return result
        for name, version in production.items():
            current = self.served.get(name)
            if current is not None and current.version_id == version.id:
                continue
            if self._refused.get(name) == version.id:
                continue  # reported once; the registry has not changed since
            problem = self._load(name, version)
            if problem:
                self._refused[name] = version.id
                result.problems.append(problem)
                log.error(problem)
            else:
                self._refused.pop(name, None)
                result.loaded.append(version.label)
                log.info("serving %s as '%s'", version.label, name)
        for name in [n for n in self.served if n not in production]:
            self.engine.remove_adapter(name)
            del self.served[name]
            result.removed.append(name)
            log.info("'%s' has no production version any more; no longer served", name)
        self._sync_canaries(result)
        return result

    def _sync_canaries(self, result: SyncResult) -> None:
        if self.aliases is None:
            return
        try:
            running = {c.name: c for c in self.registry.active_canaries()
                       if (self.names is None or c.name in self.names) and c.name in self.served}
        except Exception as exc:  # noqa: BLE001 - as above: the next poll tries again
            result.problems.append(f"registry {self.registry.url}: {str(exc).splitlines()[0]}")
            log.warning(result.problems[-1])
            return
        for name, label in list(self.canaries.items()):
            if name not in running or running[name].served_name != label:
                self.aliases.end_canary(name)
                del self.canaries[name]
                self.engine.remove_adapter(label)
                result.removed.append(label)
                log.info("canary %s ended", label)
        for name, canary in running.items():
            if name in self.canaries:
                if self._shares.get(name) != canary.share:  # changed in the registry (the /admin console)
                    self.aliases.start_canary(name, canary.served_name, canary.share)
                    self._shares[name] = canary.share
                    log.info("canary %s: now %.0f%% of '%s' users", canary.served_name, canary.share * 100, name)
                continue
            if self._refused.get(canary.served_name) == canary.candidate_id:
                continue
            folder = artifact_folder(canary.candidate)
            try:
                if folder is None:
                    raise TailorError(f"{canary.served_name}: no adapter, model or prompt profile was registered")
                verify_artifacts(canary.candidate)
                self.engine.add_adapter(canary.served_name, str(folder))
            except Exception as exc:  # noqa: BLE001 - a broken candidate leaves production answering everyone
                self._refused[canary.served_name] = canary.candidate_id
                result.problems.append(f"canary {canary.served_name}: {str(exc).splitlines()[0]}; production "
                                       f"answers everyone")
                log.error(result.problems[-1])
                continue
            self.aliases.start_canary(name, canary.served_name, canary.share)
            self.canaries[name] = canary.served_name
            self._shares[name] = canary.share
            result.loaded.append(canary.served_name)
            log.info("canary %s: %.0f%% of '%s' users", canary.served_name, canary.share * 100, name)

    def _load(self, name: str, version: ModelVersion) -> str | None:
        folder = artifact_folder(version)
        keeps = (f"; still serving {name}@{self.served[name].version}" if name in self.served
                 else "; not served")
        if folder is None:
            return f"{version.label}: no adapter, model or prompt profile was registered{keeps}"
        try:
            verify_artifacts(version)
            self.engine.add_adapter(name, str(folder))
        except TailorError as exc:
            return f"{exc}{keeps}"
        except Exception as exc:  # noqa: BLE001 - a broken adapter folder must not stop the other names
            return f"{version.label}: cannot load {folder} ({str(exc).splitlines()[0]}){keeps}"
        self.served[name] = Served(version.version, version.id, str(folder))
        return None

    # ---- background thread -------------------------------------------------------------------------------------

    def start(self) -> RegistryWatcher:
        self.sync()  # the first mapping is in place before the server answers its first request
        self._thread = threading.Thread(target=self._run, name="registry-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sync()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)


def watch_registry(engine: ServingEngine, config, root: Path) -> RegistryWatcher:
    """Start the watcher on the workspace's registry (`registry.url`, else WORKSPACE/registry.db)."""
    from tailor.registry import open_registry

    watcher = RegistryWatcher(engine, open_registry(config, root), interval=config.registry.poll_seconds)
    return watcher.start()
