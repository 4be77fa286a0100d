"""Request and response shapes of the operations console's API (`/admin/api/...`). Requests reject unknown fields;
every write carries a `reason`, which goes to the audit log with the name of the key that made the change."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

Stage = Literal["candidate", "staging", "production", "archived"]


class Reasoned(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # the pattern tells the schema (and its clients) that a reason of spaces alone is refused
    reason: str = Field(min_length=1, max_length=2000, pattern=r"\S", description=(
        "Why; kept in the audit log with the name of the key that made the change."))

    @field_validator("reason", mode="before")  # before the pattern, so a blank reason gets this message
    @classmethod
    def _not_blank(cls, reason: object) -> object:
        if isinstance(reason, str):
            if not reason.strip():
                raise PydanticCustomError("blank", "must say why (it is empty)")
            return reason.strip()
        return reason


class PromoteRequest(Reasoned):
    stage: Stage = Field(description="Where the version goes; to production, the version there is archived.")


class RollbackRequest(Reasoned):
    pass


class ShareRequest(Reasoned):
    share: float = Field(gt=0, lt=1, description="Share of the model's users the canary's candidate answers.")


class ReviewRequest(Reasoned):
    decision: Literal["accepted", "rejected"] = Field(description=(
        "accepted: `tailor improve` trains on the correction; rejected: never trained on."))
    correction: str | None = Field(None, min_length=1, max_length=20_000, description=(
        "With accepted: the correction as edited by the reviewer (default: as the user wrote it)."))

    @field_validator("correction")
    @classmethod
    def _correction_not_blank(cls, correction: str | None) -> str | None:
        if correction is not None and not correction.strip():
            raise PydanticCustomError("blank", "must not be blank (reject the correction instead)")
        return correction.strip() if correction is not None else None


class Me(BaseModel):
    name: str = Field(description="The key's name (recorded as who made a change), or the client address when "
                                  "the server has no keys.")
    scopes: list[str] = Field(description="The key's scopes; every scope when the server has no keys.")
    can_review: bool = Field(description="May accept, edit or reject corrections (reviewer).")
    can_approve: bool = Field(description="May promote, roll back and change canary shares (approver).")


class RunSummary(BaseModel):
    id: str = Field(description="The run folder, relative to the workspace (e.g. run, improve/cycle-0002).")
    created_at: str | None = Field(None, description="When the evaluation ran (ISO 8601 UTC).")
    method: str | None = Field(None, description="The customization method the run trained.")
    n_questions: int | None = Field(None, description="Questions in the eval set.")
    customized: str | None = Field(None, description="The model of the report that the run customized.")
    token_f1: float | None = Field(None, description="The customized model's token F1.")
    token_f1_gain: float | None = Field(None, description="Its token F1 minus the base model's.")
    models: dict[str, dict[str, float | None]] = Field(description="Each evaluated model's numeric metrics.")
    has_html: bool = Field(description="eval/report.html exists (GET /admin/api/runs/report.html).")
    versions: list[str] = Field(description="Registry versions registered from this run folder (city@2).")


class RunList(BaseModel):
    runs: list[RunSummary] = Field(description="Run folders with an eval/report.json, newest report first.")


class AuditEntry(BaseModel):
    id: int
    when: str = Field(description="ISO 8601 UTC.")
    version: str = Field(description="The version the change is about (city@2).")
    action: str = Field(description="register, promote, demote, rollback, canary, share, refuse, stop, …")
    from_stage: str | None
    to_stage: str
    by: str = Field(description="Who: a key's name, or the user who ran the command.")
    reason: str


class VersionSummary(BaseModel):
    name: str
    version: int
    label: str = Field(description="NAME@VERSION.")
    stage: Stage
    method: str
    base_model: str
    parent: str | None = Field(None, description="The version this one was derived from.")
    created_at: str
    run: str | None = Field(None, description="The run folder's id on the runs screen, when inside the workspace.")
    run_dir: str
    token_f1: float | None = Field(None, description="The customized model's token F1 at registration.")


class ArmCounts(BaseModel):
    up: int
    down: int
    completions: int
    rated: int
    up_rate: float | None


class CanaryView(BaseModel):
    id: int
    name: str = Field(description="The model name clients ask for.")
    candidate: str
    control: str = Field(description="The production version when the canary started.")
    share: float = Field(description="Share of the name's users the candidate answers.")
    started_at: str
    started_by: str
    reason: str
    production: ArmCounts = Field(description="Thumbs on production's answers since the canary started.")
    canary: ArmCounts = Field(description="Thumbs on the candidate's answers.")
    fisher_p: float | None = Field(None, description="Fisher's exact test on the two sides' thumbs up/down.")


class ModelsView(BaseModel):
    registry: str | None = Field(description="The registry's URL; null: this server has none.")
    names: list[str]
    versions: list[VersionSummary]
    canaries: list[CanaryView] = Field(description="Running canaries.")


class VersionDetail(VersionSummary):
    code_version: str
    datasets: dict[str, str] = Field(description="Data file → sha256.")
    artifacts: dict[str, str] = Field(description="Artifact file → sha256.")
    config: dict[str, Any] = Field(description="The resolved tailor.yaml it trained with, as dotted keys.")
    metrics: dict[str, Any] = Field(description="Training and eval metrics, as dotted keys.")
    children: list[str] = Field(description="Versions derived from this one.")
    feedback: dict[str, list[int]] = Field(description="Feedback rows it was built from, by use (sft, kto, …).")
    history: list[AuditEntry] = Field(description="Its audit log, oldest first.")


class DiffRow(BaseModel):
    key: str
    old: str = Field(description="As shown; — where the version lacks the key.")
    new: str
    change: float | None = Field(None, description="new - old, for two numbers.")


class VersionDiffView(BaseModel):
    old: str
    new: str
    lineage: list[DiffRow]
    config: list[DiffRow] = Field(description="Changed config keys only.")
    metrics: list[DiffRow] = Field(description="Every metric either version has.")


class ChangeResult(BaseModel):
    changes: list[AuditEntry] = Field(description="The audit log rows the change wrote.")


class CanaryResult(ChangeResult):
    canary: CanaryView


class FeedbackItem(BaseModel):
    id: int
    model: str
    alias: str | None
    rating: Literal["up", "down"]
    conversation: list[dict[str, Any]] = Field(description="The messages the answer replied to.")
    question: str = Field(description="The last user message.")
    answer: str
    correction: str | None = Field(description="As the user wrote it.")
    comment: str | None
    user: str | None
    created_at: str
    review: Literal["accepted", "rejected"] | None = Field(description="null: waiting for review.")
    reviewed_correction: str | None = Field(description="What trains (an accepted correction, maybe edited).")
    reviewed_by: str | None
    reviewed_at: str | None
    review_note: str | None = Field(description="The reviewer's reason.")


class FeedbackQueue(BaseModel):
    database: str = Field(description="The server's feedback database (serve.feedback_db).")
    counts: dict[str, int] = Field(description="Corrections pending, accepted and rejected.")
    items: list[FeedbackItem]


class AliasShare(BaseModel):
    model: str
    share: float


class AliasView(BaseModel):
    name: str
    canary: bool = Field(description="The split of a running canary (the alias is the model's own name).")
    split: list[AliasShare]
    report: list[dict[str, Any]] = Field(description=(
        "Per version: completions, thumbs, up-rate, latency; against the most used version Fisher's exact test "
        "(fisher_p), a two-proportion z-test (z_test_p) and Mann-Whitney U on latency (latency_p), as `tailor ab "
        "report`."))


class AbView(BaseModel):
    aliases: list[AliasView]
    canaries: list[CanaryView]
    note: str | None = Field(None, description="Why some figures are missing.")


class Signal(BaseModel):
    title: str
    unit: Literal["ratio", "seconds", "per_minute"] = Field(description="How the page prints a value.")


class MonitorView(BaseModel):
    interval_seconds: float = Field(description="Between two readings (serve.monitor_sample_seconds).")
    window_seconds: float = Field(description="The time each point covers, ending at its time.")
    models: list[str] = Field(description="Models a graph can be restricted to.")
    model: str | None = Field(description="The model these series are restricted to; null: every model.")
    signals: dict[str, Signal]
    times: list[float] = Field(description="Unix time of each point.")
    values: dict[str, list[float | None]] = Field(description="Per signal, one value per time (null: no data).")
