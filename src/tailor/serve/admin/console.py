"""What the operations console shows and changes, apart from HTTP (routes.py): the workspace's evaluated runs, the
registry (versions, lineage, diffs, promote, rollback, canary shares), the review queue of the server's feedback
database and the A/B figures. Every change goes through the function the command line uses (Registry.promote,
Registry.rollback, FeedbackStore.review, …), so the console and `tailor models` / `tailor feedback review` cannot
drift apart; `who` is the key's name and `reason` is required, both written where the command line writes them
(the registry's audit log; the review columns of the feedback row).

A problem is an `ApiError` naming the field: 404 for what does not exist, 409 for a change the current state does
not allow (a stage transition, an empty correction to accept), 400 for malformed input."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tailor.errors import TailorError
from tailor.registry import Registry
from tailor.registry.diff import MISSING, diff_versions, flatten
from tailor.registry.store import STAGES
from tailor.registry.tables import Canary, ModelVersion, StageChange
from tailor.serve.ab import report as ab_report
from tailor.serve.admin import protocol as p
from tailor.serve.admin.history import SIGNALS, MetricsHistory
from tailor.serve.feedback import FeedbackStore
from tailor.serve.openai.protocol import ApiError
from tailor.serve.openai.serving import Services
from tailor.workspace import read_json

REPORT = Path("eval") / "report.json"
REPORT_HTML = Path("eval") / "report.html"
RUN_DEPTH = 3  # run folders this deep in the workspace: run/, improve/cycle-0002/, run/tune/trial-007/
SKIPPED = {"node_modules", "__pycache__", "site-packages", "logs", "data", "index", "adapter", "model", "eval"}
# what the diff's `old` and `new` must look like (checked as the query's pattern, so the schema says it too)
REF = rf"^[A-Za-z0-9][A-Za-z0-9_.-]*@(\d+|latest|{'|'.join(STAGES)})$"


def _iso(moment: datetime) -> str:
    """SQLite gives the registry's times back without their zone; they were written in UTC."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat(timespec="seconds")


def _show(value: Any) -> str:
    if value is MISSING:
        return "—"
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:.6g}"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _customized(report: dict) -> str | None:
    names = list(report.get("models", {}))
    return report.get("method") if report.get("method") in names else (names[-1] if names else None)


@dataclass
class Console:
    root: Path  # the workspace: its run folders are the runs screen
    services: Services
    registry: Registry | None
    history: MetricsHistory

    def _record(self, action: str, target: str, who: str, reason: str, **details: Any) -> None:
        """A line in the request log too (serve.request_log), beside the registry's audit log or the review
        columns: one place that lists every change made through the console."""
        self.services.request_log.write(event="admin", action=action, target=target, key=who, reason=reason,
                                        **details)

    # ---- runs ------------------------------------------------------------------------------------------------

    def run_folders(self) -> dict[str, Path]:
        """Every folder up to RUN_DEPTH below the workspace with an eval/report.json, by its relative path. Hidden
        folders and the stages' own subfolders (data/, adapter/, …) are not entered: a workspace holds corpora."""
        found: dict[str, Path] = {}
        root = self.root.resolve()

        def walk(folder: Path, depth: int) -> None:
            try:
                entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
            except OSError:
                return
            for entry in entries:
                if entry.name.startswith(".") or entry.name in SKIPPED or not entry.is_dir(follow_symlinks=False):
                    continue
                path = Path(entry.path)
                if (path / REPORT).is_file():
                    found[path.relative_to(root).as_posix()] = path
                if depth < RUN_DEPTH:
                    walk(path, depth + 1)

        if (root / REPORT).is_file():
            found["."] = root
        walk(root, 1)
        return found

    def _run(self, run: str) -> Path:
        folder = self.run_folders().get(run)
        if folder is None:
            raise ApiError(404, f"run: no run folder '{run}' with an eval/report.json in the workspace", param="run",
                           code="run_not_found")
        return folder

    def runs(self) -> p.RunList:
        labels: dict[Path, list[str]] = {}
        for version in self._versions():
            labels.setdefault(Path(version.run_dir).resolve(), []).append(version.label)
        runs = []
        for run_id, folder in self.run_folders().items():
            try:
                report = read_json(folder / REPORT)
            except TailorError:
                continue  # being rewritten, or not a report: left out rather than failing the whole list
            if not isinstance(report, dict):
                continue
            customized = _customized(report)
            models = {name: {key: value for key, value in metrics.items() if _numeric(value) or value is None}
                      for name, metrics in report.get("models", {}).items() if isinstance(metrics, dict)}
            runs.append(p.RunSummary(
                id=run_id, created_at=report.get("created_at"), method=report.get("method"),
                n_questions=report.get("n_questions"), customized=customized,
                token_f1=models.get(customized or "", {}).get("token_f1"), token_f1_gain=report.get("token_f1_gain"),
                models=models, has_html=(folder / REPORT_HTML).is_file(), versions=labels.get(folder.resolve(), [])))
        runs.sort(key=lambda run: run.created_at or "", reverse=True)
        return p.RunList(runs=runs)

    def report(self, run: str) -> dict[str, Any]:
        return read_json(self._run(run) / REPORT)

    def report_html(self, run: str) -> str:
        path = self._run(run) / REPORT_HTML
        if not path.is_file():
            raise ApiError(404, f"run: '{run}' has no eval/report.html (eval.html was off); its report.json is at "
                                f"GET /admin/api/runs/report", param="run", code="report_not_found")
        return path.read_text(encoding="utf-8")

    # ---- registry --------------------------------------------------------------------------------------------

    def _registry(self) -> Registry:
        if self.registry is None:
            raise ApiError(409, "this server has no model registry: start it in a workspace with one (tailor models "
                                "register) or with --registry", code="no_registry")
        return self.registry

    def _versions(self) -> list[ModelVersion]:
        return self.registry.versions() if self.registry is not None else []

    def _run_id(self, version: ModelVersion) -> str | None:
        folder, root = Path(version.run_dir).resolve(), self.root.resolve()
        if folder == root:
            return "."
        return folder.relative_to(root).as_posix() if folder.is_relative_to(root) else None

    def _summary(self, version: ModelVersion, labels: dict[int, str]) -> dict[str, Any]:
        tuned = version.metrics.get("eval", {}).get(version.method, {})
        return {"name": version.name, "version": version.version, "label": version.label, "stage": version.stage,
                "method": version.method, "base_model": version.base_model,
                "parent": None if version.parent_id is None else labels.get(version.parent_id),
                "created_at": _iso(version.created_at), "run": self._run_id(version), "run_dir": version.run_dir,
                "token_f1": tuned.get("token_f1") if isinstance(tuned, dict) else None}

    def _canary(self, canary: Canary) -> p.CanaryView:
        from tailor.improve.decide import ab_counts  # the figures `tailor improve --decide` judges by

        counts = ab_counts(Path(self.services.feedback.path), canary) if self._feedback_file() else {
            "production": {}, "candidate": {}, "fisher_p": None}

        def arm(side: dict) -> p.ArmCounts:
            return p.ArmCounts(up=side.get("up", 0), down=side.get("down", 0), completions=side.get("completions", 0),
                               rated=side.get("rated", 0), up_rate=side.get("up_rate"))

        return p.CanaryView(id=canary.id, name=canary.name, candidate=canary.candidate.label,
                            control=canary.control.label, share=canary.share, started_at=_iso(canary.started_at),
                            started_by=canary.started_by, reason=canary.reason, production=arm(counts["production"]),
                            canary=arm(counts["candidate"]), fisher_p=counts["fisher_p"])

    def models(self) -> p.ModelsView:
        if self.registry is None:
            return p.ModelsView(registry=None, names=[], versions=[], canaries=[])
        versions = self.registry.versions()
        labels = {version.id: version.label for version in versions}
        return p.ModelsView(registry=self.registry.url, names=self.registry.names(),
                            versions=[p.VersionSummary(**self._summary(v, labels)) for v in versions],
                            canaries=[self._canary(c) for c in self.registry.active_canaries()])

    def _resolve(self, ref: str, param: str) -> ModelVersion:
        try:
            return self._registry().resolve(ref)
        except TailorError as exc:
            raise ApiError(404, f"{param}: {exc}", param=param, code="version_not_found") from None

    def _name(self, name: str) -> None:
        if name not in self._registry().names():
            raise ApiError(404, f"name: no model named '{name}' in the registry", param="name",
                           code="model_not_found")

    def version(self, name: str, version: int) -> p.VersionDetail:
        self._name(name)
        found = self._resolve(f"{name}@{version}", "version")
        registry = self._registry()
        versions = registry.versions()
        labels = {v.id: v.label for v in versions}
        return p.VersionDetail(**self._summary(found, labels), code_version=found.code_version,
                               datasets=found.datasets, artifacts=found.artifacts, config=flatten(found.config),
                               metrics=flatten(found.metrics),
                               children=[v.label for v in versions if v.parent_id == found.id],
                               feedback=registry.feedback_of(found),
                               history=[_entry(change) for change in registry.history(version_id=found.id)])

    def audit(self, name: str | None) -> list[p.AuditEntry]:
        """The audit log, newest first (of one model, or of every model)."""
        if self.registry is None:
            return []
        if name is not None:
            self._name(name)
        return [_entry(change) for change in reversed(self.registry.history(name))]

    def diff(self, old: str, new: str) -> p.VersionDiffView:
        before, after = self._resolve(old, "old"), self._resolve(new, "new")
        labels = {version.id: version.label for version in self._registry().versions()}
        result = diff_versions(before, after, labels)
        return p.VersionDiffView(
            old=before.label, new=after.label,
            lineage=[p.DiffRow(key=key, old=_show(a), new=_show(b)) for key, a, b in result.lineage],
            config=[p.DiffRow(key=key, old=_show(a), new=_show(b)) for key, a, b in result.config],
            metrics=[p.DiffRow(key=key, old=_show(a), new=_show(b), change=delta)
                     for key, a, b, delta in result.metrics])

    def promote(self, name: str, version: int, stage: str, who: str, reason: str) -> p.ChangeResult:
        self._name(name)
        self._resolve(f"{name}@{version}", "version")
        try:
            changes = self._registry().promote(name, version, stage, by=who, reason=reason)
        except TailorError as exc:  # a transition the stage does not allow, or an artifact that changed on disk
            raise ApiError(409, f"stage: {exc}", param="stage", code="transition_refused") from None
        self._record("promote", f"{name}@{version}", who, reason, stage=stage)
        return p.ChangeResult(changes=[_entry(change) for change in changes])

    def rollback(self, name: str, who: str, reason: str) -> p.ChangeResult:
        self._name(name)
        registry = self._registry()
        try:
            registry.rollback(name, by=who, reason=reason)
        except TailorError as exc:  # nothing in production, nothing earlier to go back to, a corrupted artifact
            raise ApiError(409, f"name: {exc}", param="name", code="rollback_refused") from None
        self._record("rollback", name, who, reason)
        # the rollback's two rows (current → archived, earlier → production) are the model's last
        return p.ChangeResult(changes=[_entry(change) for change in registry.history(name)[-2:]])

    def set_share(self, canary_id: int, share: float, who: str, reason: str) -> p.CanaryResult:
        registry = self._registry()
        if not any(canary.id == canary_id for canary in registry.active_canaries()):
            raise ApiError(404, f"canary_id: no running canary {canary_id}", param="canary_id",
                           code="canary_not_found")
        try:
            canary = registry.set_canary_share(canary_id, share, by=who, reason=reason)
        except TailorError as exc:  # the same share again, or the canary ended meanwhile
            raise ApiError(409, f"share: {exc}", param="share", code="share_refused") from None
        self._record("canary_share", canary.candidate.label, who, reason, share=share)
        change = registry.history(version_id=canary.candidate_id)[-1]
        return p.CanaryResult(changes=[_entry(change)], canary=self._canary(canary))

    # ---- the review queue ----------------------------------------------------------------------------------------

    def _feedback_file(self) -> bool:
        return self.services.feedback.path != ":memory:"

    def queue(self, status: str) -> p.FeedbackQueue:
        store: FeedbackStore = self.services.feedback
        where = {"pending": "f.review IS NULL", "accepted": "f.review = 'accepted'",
                 "rejected": "f.review = 'rejected'", "all": "1"}[status]
        rows = store.rows(f"f.correction IS NOT NULL AND {where}")
        every = store.rows("f.correction IS NOT NULL")
        counts = {name: sum(1 for row in every if row["review"] == review)
                  for name, review in (("pending", None), ("accepted", "accepted"), ("rejected", "rejected"))}
        return p.FeedbackQueue(database=store.path, counts=counts, items=[_item(row) for row in reversed(rows)])

    def review(self, feedback_id: int, decision: str, correction: str | None, who: str,
               reason: str) -> p.FeedbackItem:
        store = self.services.feedback
        if not store.rows("f.id = ? AND f.correction IS NOT NULL", (feedback_id,)):
            raise ApiError(404, f"feedback_id: no correction {feedback_id} in the review queue", param="feedback_id",
                           code="feedback_not_found")
        if decision == "rejected" and correction is not None:
            raise ApiError(400, "correction: only an accepted correction is edited", param="correction",
                           code="invalid_value")
        try:
            store.review(feedback_id, decision, by=who, correction=correction, note=reason)
        except TailorError as exc:  # accepting a correction that is empty: edit it or reject it
            raise ApiError(409, f"correction: {exc}", param="correction", code="empty_correction") from None
        self._record("review", f"feedback {feedback_id}", who, reason, decision=decision)
        return _item(store.rows("f.id = ?", (feedback_id,))[0])

    # ---- A/B tests and canaries ----------------------------------------------------------------------------------

    def ab(self) -> p.AbView:
        aliases = self.services.aliases
        note = None
        reports: dict[str, list[dict]] = {}
        if self._feedback_file():
            try:
                reports = ab_report(self.services.feedback.path)
            except TailorError as exc:
                note = str(exc)
        else:
            note = "serve.feedback_db is :memory:, so no A/B figures are kept"
        canaries = [self._canary(c) for c in self.registry.active_canaries()] if self.registry is not None else []
        views = [p.AliasView(name=name, canary=name in aliases.canaries,
                             split=[p.AliasShare(model=model, share=share) for model, share in split],
                             report=reports.get(name, []))
                 for name, split in aliases.aliases.items()]
        # aliases the database remembers that this server no longer splits (an A/B test that ended, or a canary
        # shown above): their figures stay readable, with no split
        running = {canary.name for canary in canaries} | set(aliases.aliases)
        views += [p.AliasView(name=name, canary=False, split=[], report=rows) for name, rows in reports.items()
                  if name not in running]
        return p.AbView(aliases=views, canaries=canaries, note=note)

    # ---- monitoring ----------------------------------------------------------------------------------------------

    def monitor(self, model: str | None) -> p.MonitorView:
        names = [*self.services.engine.model_names(), *self.services.aliases.names()]
        if model is not None and model not in names:
            raise ApiError(404, f"model: '{model}' is not served here (models: {', '.join(names)})", param="model",
                           code="model_not_found")
        series = self.history.series(model)
        signals = {name: p.Signal(title=title, unit=unit) for name, (title, unit) in SIGNALS.items()}
        return p.MonitorView(interval_seconds=self.history.interval, window_seconds=self.history.window,
                             models=names, model=model, signals=signals, times=series["times"],
                             values=series["signals"])


def _entry(change: StageChange) -> p.AuditEntry:
    return p.AuditEntry(id=change.id, when=_iso(change.changed_at), version=change.version.label,
                        action=change.action, from_stage=change.from_stage, to_stage=change.to_stage,
                        by=change.changed_by, reason=change.reason)


def _item(row: dict) -> p.FeedbackItem:
    conversation = json.loads(row["prompt"])
    question = next((m.get("content", "") for m in reversed(conversation) if m.get("role") == "user"), "")
    return p.FeedbackItem(conversation=conversation, question=question,
                          **{key: row[key] for key in ("id", "model", "alias", "rating", "answer", "correction",
                                                       "comment", "user", "created_at", "review",
                                                       "reviewed_correction", "reviewed_by", "reviewed_at",
                                                       "review_note")})
