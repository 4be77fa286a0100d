"""Register runs, move versions between stages, roll production back, resolve "NAME@production" to a version.

Every change runs in one database transaction that validates before it writes, so bad input (an unknown version,
an unknown stage, a transition that is not allowed, an artifact whose files no longer match their registered
checksums when it would go to staging or production) changes nothing. Stage changes are appended to the audit log
in the same transaction as the change itself.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine, func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from tailor.errors import TailorError
from tailor.registry.lineage import read_lineage
from tailor.registry.tables import Base, Canary, ModelVersion, StageChange, VersionFeedback, utc_now
from tailor.workspace import file_sha256

REGISTRY_FILE = "registry.db"
STAGES = ("candidate", "staging", "production", "archived")
# where a version may go from each stage; a version reaches production only by promotion or rollback, and leaves
# it only for archived (promoting another version archives the old one)
TRANSITIONS = {
    "candidate": ("staging", "production", "archived"),
    "staging": ("production", "archived"),
    "production": ("archived",),
    "archived": ("staging", "production"),
}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def registry_url(config, root: Path) -> str:
    """`registry.url` from tailor.yaml, else the SQLite file WORKSPACE/registry.db."""
    if config.registry.url:
        return config.registry.url
    return f"sqlite:///{(Path(root) / REGISTRY_FILE).resolve()}"


def open_registry(config, root: Path) -> Registry:
    return Registry(registry_url(config, root))


def current_user(by: str | None = None) -> str:
    if by:
        return by
    with contextlib.suppress(Exception):
        return os.environ.get("USER") or getpass.getuser()
    return "unknown"


def check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise TailorError(f"unknown stage '{stage}' (stages: {', '.join(STAGES)})")
    return stage


def split_ref(ref: str) -> tuple[str, str | None]:
    """"NAME@3" → ("NAME", "3"); "NAME@production" → ("NAME", "production"); "NAME" → ("NAME", None)."""
    name, sep, selector = ref.partition("@")
    if not name or (sep and not selector):
        raise TailorError(f"'{ref}': expected NAME, NAME@VERSION or NAME@STAGE (e.g. city@3, city@production)")
    return name, selector or None


class Registry:
    def __init__(self, url: str):
        self.url = url
        try:
            self.engine = create_engine(url)
            Base.metadata.create_all(self.engine)
        except (OperationalError, ImportError) as exc:
            raise TailorError(f"registry.url: cannot open the registry at {url} "
                              f"({str(exc).splitlines()[0]})") from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """One session in one transaction: committed when the block ends, rolled back on any error."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    # ---- reading -------------------------------------------------------------------------------------------

    def _versions_of(self, session: Session, name: str) -> list[ModelVersion]:
        versions = list(session.scalars(select(ModelVersion).where(ModelVersion.name == name)
                                        .order_by(ModelVersion.version)))
        if not versions:
            names = self.names(session)
            known = f"registered: {', '.join(names)}" if names else "the registry is empty"
            raise TailorError(f"no model named '{name}' in the registry ({known})")
        return versions

    def names(self, session: Session | None = None) -> list[str]:
        with contextlib.nullcontext(session) if session else self.transaction() as s:
            return list(s.scalars(select(ModelVersion.name).distinct().order_by(ModelVersion.name)))

    def _resolve(self, session: Session, ref: str) -> ModelVersion:
        name, selector = split_ref(ref)
        versions = self._versions_of(session, name)
        if selector is None or selector == "latest":
            return versions[-1]
        if selector.isdigit():
            for version in versions:
                if version.version == int(selector):
                    return version
            raise TailorError(f"{name} has no version {selector} "
                              f"(versions: {', '.join(str(v.version) for v in versions)})")
        if selector in STAGES:
            in_stage = [v for v in versions if v.stage == selector]
            if not in_stage:
                raise TailorError(f"{name} has no version in {selector}")
            return in_stage[-1]
        raise TailorError(f"'{ref}': after @ comes a version number, 'latest' or a stage ({', '.join(STAGES)})")

    def resolve(self, ref: str, *, verify: bool = False) -> ModelVersion:
        """The version "NAME@3", "NAME@production" (or any stage: its latest version there) or "NAME" (latest)
        names; with `verify`, every artifact file must still have its registered checksum."""
        with self.transaction() as session:
            version = self._resolve(session, ref)
        if verify:
            verify_artifacts(version)
        return version

    def versions(self, name: str | None = None) -> list[ModelVersion]:
        with self.transaction() as session:
            if name is not None:
                return self._versions_of(session, name)
            return list(session.scalars(select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version)))

    def history(self, name: str | None = None, version_id: int | None = None) -> list[StageChange]:
        """Audit log rows, oldest first; `change.version` is the version each is about."""
        query = select(StageChange).join(ModelVersion, StageChange.version_id == ModelVersion.id)
        if name is not None:
            query = query.where(ModelVersion.name == name)
        if version_id is not None:
            query = query.where(StageChange.version_id == version_id)
        with self.transaction() as session:
            if name is not None:
                self._versions_of(session, name)  # an unknown name is an error, not an empty log
            return list(session.scalars(query.order_by(StageChange.id)))

    def parent_of(self, version: ModelVersion) -> ModelVersion | None:
        if version.parent_id is None:
            return None
        with self.transaction() as session:
            return session.get(ModelVersion, version.parent_id)

    # ---- changing ------------------------------------------------------------------------------------------

    def register_run(self, run_dir: Path | str, name: str, parent: str | None = None, *, by: str | None = None,
                     reason: str = "", feedback: tuple[str, dict[str, list[int]]] | None = None) -> ModelVersion:
        """Record the run as the next version of `name`, as a candidate; `feedback`: (feedback database, {use:
        row ids}) the run was built from, kept as its lineage (`feedback_of`)."""
        if not NAME_PATTERN.match(name):
            raise TailorError(f"--name '{name}': use letters, digits, '_', '.' and '-', starting with a letter "
                              "or digit")
        lineage = read_lineage(run_dir)  # hashes the files before the transaction opens
        try:
            with self.transaction() as session:
                parent_id = self._resolve(session, parent).id if parent else None
                latest = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == name))
                version = ModelVersion(name=name, version=(latest or 0) + 1, stage="candidate",
                                       base_model=lineage.base_model, method=lineage.method,
                                       run_dir=str(lineage.run_dir), config=lineage.config,
                                       datasets=lineage.datasets, code_version=lineage.code_version,
                                       metrics=lineage.metrics, artifacts=lineage.artifacts, parent_id=parent_id)
                session.add(version)
                session.add(StageChange(version=version, action="register", from_stage=None,
                                        to_stage="candidate", changed_by=current_user(by), reason=reason))
                if feedback is not None:
                    database, uses = feedback
                    session.flush()  # the version's id
                    session.add_all(VersionFeedback(version_id=version.id, feedback_db=database, feedback_id=row,
                                                    use=use) for use, rows in uses.items() for row in rows)
        except IntegrityError:  # another process registered the same version number at the same moment
            raise TailorError(f"{name}: registered concurrently by someone else; run the command again") from None
        return version

    def promote(self, name: str, version: int | str, stage: str, *, by: str | None = None,
                reason: str = "") -> list[StageChange]:
        """Move NAME@VERSION to `stage`; promoting to production archives the version that was there."""
        check_stage(stage)
        who = current_user(by)
        with self.transaction() as session:
            target = self._resolve(session, f"{name}@{version}")
            if target.stage == stage:
                raise TailorError(f"{target.label} is already in {stage}")
            if stage not in TRANSITIONS[target.stage]:
                raise TailorError(f"{target.label} is in {target.stage}; from there it can go to "
                                  f"{', '.join(TRANSITIONS[target.stage])} (not {stage})")
            if stage in ("staging", "production"):
                verify_artifacts(target)  # a corrupted artifact must never go live; raising here changes nothing
            changes = []
            if stage == "production":
                for previous in self._in_stage(session, name, "production"):
                    changes.append(self._move(session, previous, "archived", "demote", who,
                                              f"replaced in production by {target.label}"
                                              + (f": {reason}" if reason else "")))
            changes.append(self._move(session, target, stage, "promote", who, reason))
        return changes

    def rollback(self, name: str, *, by: str | None = None, reason: str = "") -> tuple[ModelVersion, ModelVersion]:
        """Put back the version that was in production before the current one (undoing promotions in order:
        a second rollback goes one further back). Returns (rolled back, restored)."""
        who = current_user(by)
        with self.transaction() as session:
            self._versions_of(session, name)
            current = self._in_stage(session, name, "production")
            if not current:
                raise TailorError(f"{name} has no version in production to roll back")
            current_version = current[-1]
            earlier = [vid for vid in self._production_stack(session, name) if vid != current_version.id]
            if not earlier:
                raise TailorError(f"{name}: no earlier production version to roll back to "
                                  f"({current_version.label} is the first)")
            restored = session.get(ModelVersion, earlier[-1])
            if restored is None:  # the stack's ids come from a join with this table, in this transaction
                raise AssertionError(f"{name}: version id {earlier[-1]} in the production history is not registered")
            verify_artifacts(restored)  # rolling back onto a corrupted artifact would take the model down
            note = reason or "rollback"
            self._move(session, current_version, "archived", "rollback", who, note)
            self._move(session, restored, "production", "rollback", who, note)
        return current_version, restored

    def decide(self, name: str, version: int | str, stage: str, *, action: str, by: str | None = None,
               reason: str = "") -> StageChange:
        """A decision about a version that is no promotion (e.g. `refuse`: a candidate the gates stopped goes to
        archived), recorded in the audit log like any stage change. Not for production: use promote/rollback."""
        check_stage(stage)
        if stage == "production":
            raise TailorError("production is reached by promote or rollback only")
        with self.transaction() as session:
            target = self._resolve(session, f"{name}@{version}")
            if stage not in TRANSITIONS[target.stage]:
                raise TailorError(f"{target.label} is in {target.stage}; from there it can go to "
                                  f"{', '.join(TRANSITIONS[target.stage])} (not {stage})")
            return self._move(session, target, stage, action, current_user(by), reason)

    def feedback_of(self, version: ModelVersion) -> dict[str, list[int]]:
        """The feedback rows a version was built from, by use (sft, kto, dpo, regression)."""
        with self.transaction() as session:
            rows = session.scalars(select(VersionFeedback).where(VersionFeedback.version_id == version.id)
                                   .order_by(VersionFeedback.id))
            uses: dict[str, list[int]] = {}
            for row in rows:
                uses.setdefault(row.use, []).append(row.feedback_id)
            return uses

    def used_feedback(self, name: str) -> set[int]:
        """Every feedback row id a version of `name` that reached production was trained on (regression checks not
        counted). A refused or rolled-back candidate's rows stay available: the next cycle may use them better."""
        with self.transaction() as session:
            promoted = select(StageChange.version_id).where(StageChange.to_stage == "production")
            return set(session.scalars(select(VersionFeedback.feedback_id)
                                       .join(ModelVersion, VersionFeedback.version_id == ModelVersion.id)
                                       .where(ModelVersion.name == name, VersionFeedback.use != "regression",
                                              ModelVersion.id.in_(promoted))))

    # ---- canaries ------------------------------------------------------------------------------------------

    def start_canary(self, name: str, version: int | str, share: float, *, by: str | None = None,
                     reason: str = "") -> Canary:
        """Serve NAME@VERSION to `share` of NAME's users beside production: the version goes to staging (action
        `canary` in the audit log) and a server with --registry starts routing within one poll."""
        if not 0 < share < 1:
            raise TailorError(f"canary share must be between 0 and 1 (found {share})")
        who = current_user(by)
        with self.transaction() as session:
            candidate = self._resolve(session, f"{name}@{version}")
            running = self._active_canaries(session, name)
            if running:
                raise TailorError(f"{name}: the canary of {running[0].candidate.label} is still running; decide it "
                                  f"first (tailor improve --decide)")
            production = self._in_stage(session, name, "production")
            if not production:
                raise TailorError(f"{name} has no version in production to compare the canary with")
            if candidate.stage != "candidate":
                raise TailorError(f"{candidate.label} is in {candidate.stage}; only a candidate can start a canary")
            verify_artifacts(candidate)  # a corrupted artifact must never answer users
            self._move(session, candidate, "staging", "canary", who,
                       reason or f"canary: {share:.0%} of {name}'s users beside {production[-1].label}")
            canary = Canary(name=name, candidate=candidate, control=production[-1], share=share, started_by=who,
                            reason=reason)
            session.add(canary)
        return canary

    def active_canaries(self, name: str | None = None) -> list[Canary]:
        with self.transaction() as session:
            return self._active_canaries(session, name)

    def canaries(self, name: str) -> list[Canary]:
        """Every canary of `name`, oldest first."""
        with self.transaction() as session:
            return list(session.scalars(select(Canary).where(Canary.name == name).order_by(Canary.id)))

    def set_canary_share(self, canary_id: int, share: float, *, by: str | None = None, reason: str = "") -> Canary:
        """Send another share of the users to a running canary. The audit log records it as a `share` row on the
        candidate (its stage unchanged) with the old and the new share; a server with --registry follows within one
        poll."""
        if not 0 < share < 1:
            raise TailorError(f"canary share must be between 0 and 1 (found {share})")
        who = current_user(by)
        with self.transaction() as session:
            canary = _running_canary(session, canary_id)
            if canary.share == share:
                raise TailorError(f"canary {canary_id} already sends {share:.0%} of {canary.name}'s users to "
                                  f"{canary.candidate.label}")
            stage = canary.candidate.stage
            session.add(StageChange(version=canary.candidate, action="share", from_stage=stage, to_stage=stage,
                                    changed_by=who, reason=f"canary share {canary.share:.0%} → {share:.0%}"
                                    + (f": {reason}" if reason else "")))
            canary.share = share
        return canary

    def end_canary(self, canary_id: int, outcome: str, *, by: str | None = None, reason: str = "") -> Canary:
        """End a canary: `promoted` puts the candidate in production (the old version archived), `rolled_back`
        archives the candidate (action `rollback`), `stopped` archives it without judging it. One transaction:
        the canary's end and the stage changes are written together or not at all."""
        if outcome not in ("promoted", "rolled_back", "stopped"):
            raise TailorError(f"canary outcome must be promoted, rolled_back or stopped (found {outcome!r})")
        who = current_user(by)
        with self.transaction() as session:
            canary = _running_canary(session, canary_id)
            candidate = canary.candidate
            if outcome == "promoted":
                verify_artifacts(candidate)
                for previous in self._in_stage(session, canary.name, "production"):
                    self._move(session, previous, "archived", "demote", who,
                               f"replaced in production by {candidate.label}: {reason}")
                self._move(session, candidate, "production", "promote", who, reason)
            else:
                self._move(session, candidate, "archived", "rollback" if outcome == "rolled_back" else "stop", who,
                           reason)
            canary.ended_at, canary.outcome, canary.reason = utc_now(), outcome, reason
        return canary

    # ---- helpers -------------------------------------------------------------------------------------------

    @staticmethod
    def _active_canaries(session: Session, name: str | None) -> list[Canary]:
        query = select(Canary).where(Canary.ended_at.is_(None))
        if name is not None:
            query = query.where(Canary.name == name)
        return list(session.scalars(query.order_by(Canary.id)))

    @staticmethod
    def _in_stage(session: Session, name: str, stage: str) -> list[ModelVersion]:
        return list(session.scalars(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.stage == stage)
                                    .order_by(ModelVersion.version)))

    @staticmethod
    def _move(session: Session, version: ModelVersion, stage: str, action: str, who: str,
              reason: str) -> StageChange:
        change = StageChange(version=version, action=action, from_stage=version.stage, to_stage=stage,
                             changed_by=who, reason=reason)
        version.stage = stage
        session.add(change)
        return change

    @staticmethod
    def _production_stack(session: Session, name: str) -> list[int]:
        """Version ids in the order they entered production, from the audit log: a promotion pushes, a rollback
        pops the version it rolled back, and a version archived on purpose (not replaced) leaves the stack."""
        changes = session.scalars(select(StageChange).join(ModelVersion, StageChange.version_id == ModelVersion.id)
                                  .where(ModelVersion.name == name).order_by(StageChange.id))
        stack: list[int] = []
        for change in changes:
            if change.to_stage == "production" and change.action == "promote":
                stack.append(change.version_id)
            elif change.from_stage == "production" and change.action == "rollback":
                if stack and stack[-1] == change.version_id:
                    stack.pop()
            elif change.from_stage == "production" and change.action == "promote":  # withdrawn by hand
                stack = [vid for vid in stack if vid != change.version_id]
        return stack


def verify_artifacts(version: ModelVersion) -> None:
    """Every artifact file must exist with its registered sha256; the first that does not is named."""
    run_dir = Path(version.run_dir)
    for relative, expected in version.artifacts.items():
        path = run_dir / relative
        if not path.is_file():
            raise TailorError(f"{version.label}: artifact {path} is missing (registered with sha256 "
                              f"{expected[:12]}…)")
        found = file_sha256(path)
        if found != expected:
            raise TailorError(f"{version.label}: checksum mismatch for {path}: registered sha256 {expected[:12]}…, "
                              f"found {found[:12]}…; the file changed after registration")


def _running_canary(session, canary_id: int) -> Canary:
    canary = session.get(Canary, canary_id)
    if canary is None or canary.ended_at is not None:
        raise TailorError(f"canary {canary_id}: no such running canary")
    return canary
