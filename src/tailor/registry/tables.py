"""The registry's two tables. Plain SQLAlchemy 2.x ORM with portable column types, so the same schema runs on the
default SQLite file and on PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


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
