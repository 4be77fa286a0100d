"""The registry's tables: versions, their stage changes (the audit log), canaries and the feedback rows behind a
version. Plain SQLAlchemy 2.x ORM with portable column types, so the same schema runs on the default SQLite file and
on PostgreSQL; tables added later are created in an existing database when it is opened (create_all)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utc_now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class ModelVersion(Base):
    """One registered run: version `version` of the model `name`."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_versions_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[int] = mapped_column(Integer)  # 1, 2, … per name
    stage: Mapped[str] = mapped_column(String(20), default="candidate")
    base_model: Mapped[str] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(50))
    run_dir: Mapped[str] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # the resolved tailor.yaml the run trained with
    datasets: Mapped[dict[str, str]] = mapped_column(JSON)  # data file path → sha256, from manifest.json
    code_version: Mapped[str] = mapped_column(String(100))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"train": {...}, "eval": {model: {...}}, …}
    artifacts: Mapped[dict[str, str]] = mapped_column(JSON)  # path relative to run_dir → sha256
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


class StageChange(Base):
    """One row per stage change of a version, registration included: what, when, by whom, why."""

    __tablename__ = "stage_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # increasing: the order of events
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    # register (None → candidate), promote, demote (replaced in production by another version), rollback
    action: Mapped[str] = mapped_column(String(20))
    from_stage: Mapped[str | None] = mapped_column(String(20), nullable=True)
    to_stage: Mapped[str] = mapped_column(String(20))
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    changed_by: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text, default="")
    version: Mapped[ModelVersion] = relationship(lazy="joined")  # loaded with the row: usable after the session


class Canary(Base):
    """A candidate served to a share of the users of its model's name beside the production version (`tailor
    improve`), until a decision ends it: promoted, rolled back or stopped."""

    __tablename__ = "canaries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)  # the model name clients ask for
    candidate_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    control_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))  # production when the canary started
    share: Mapped[float] = mapped_column(Float)  # of users, sticky per user
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    started_by: Mapped[str] = mapped_column(String(200))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(20), nullable=True)  # promoted, rolled_back, stopped
    reason: Mapped[str] = mapped_column(Text, default="")
    candidate: Mapped[ModelVersion] = relationship(foreign_keys=[candidate_id], lazy="joined")
    control: Mapped[ModelVersion] = relationship(foreign_keys=[control_id], lazy="joined")

    @property
    def served_name(self) -> str:
        """What the server calls the candidate while the canary runs (its label, e.g. city@4): feedback on its
        answers carries this name, so the A/B report and the monitor tell the two versions apart."""
        return self.candidate.label


class VersionFeedback(Base):
    """Lineage down to the feedback rows: which rows of which feedback database a version was trained or
    checked on, and how (sft: a correction; kto: a rated answer; dpo: one side of a pair; regression: eval)."""

    __tablename__ = "version_feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    feedback_db: Mapped[str] = mapped_column(Text)
    feedback_id: Mapped[int] = mapped_column(Integer)
    use: Mapped[str] = mapped_column(String(20))
