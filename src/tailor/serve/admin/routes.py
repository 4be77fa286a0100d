"""HTTP routes of the operations console's API, under /admin/api. Thin on purpose: authorize by role, parse, hand to
console.py (run in a worker thread: the registry and the feedback database are blocking calls), wrap the answer.

Roles are key scopes, each allowing what the one before allows: `viewer` reads every screen, `reviewer` also decides
corrections, `approver` also promotes, rolls back and changes canary shares; `admin` allows everything. Without keys
(a server on 127.0.0.1 only) everything is allowed and changes are recorded under the client's address."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from tailor.serve.admin import protocol as p
from tailor.serve.admin.console import REF, Console
from tailor.serve.openai.routes import authorize, errors
from tailor.serve.security import Caller

router = APIRouter(prefix="/admin/api")

# ids are SQLite integers: a larger number would overflow in the driver instead of being a clean 404
Id = Annotated[int, Path(ge=1, le=2**63 - 1, description="The id as the console lists it.")]
READ = errors(401, 403, 429)


def json_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """errors() for a route whose own answer is not JSON: FastAPI would document the error body in the route's media
    type (text/html), so the body's JSON schema is given outright."""
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    return {status: {key: value for key, value in response.items() if key != "model"} | {"content": body}
            for status, response in errors(*statuses).items()}


def console_of(request: Request) -> Console:
    return request.app.state.console


def viewer(request: Request) -> Caller:
    return authorize(request, "viewer")


def reviewer(request: Request) -> Caller:
    return authorize(request, "reviewer")


def approver(request: Request) -> Caller:
    return authorize(request, "approver")


def who(caller: Caller) -> str:
    """What the audit log records: the key's name, never the key."""
    return caller.key.name if caller.key is not None else caller.identity


@router.get("/me", responses=READ)
async def me(caller: Caller = Depends(viewer)) -> p.Me:
    """Who the key is and what its role allows; the console shows only the actions it may take."""
    if caller.key is None:
        return p.Me(name=caller.identity, scopes=["admin"], can_review=True, can_approve=True)
    return p.Me(name=caller.key.name, scopes=list(caller.key.scopes), can_review=caller.key.allows("reviewer"),
                can_approve=caller.key.allows("approver"))


@router.get("/runs", responses=READ)
async def runs(request: Request, caller: Caller = Depends(viewer)) -> p.RunList:
    """The workspace's run folders with an eval report, newest first, with each model's metrics."""
    return await run_in_threadpool(console_of(request).runs)


RunQuery = Annotated[str, Query(description="A run's id from GET /admin/api/runs (e.g. run, improve/cycle-0002).")]


@router.get("/runs/report", responses=errors(400, 401, 403, 404, 429))
async def run_report(run: RunQuery, request: Request, caller: Caller = Depends(viewer)) -> dict[str, Any]:
    """A run's eval/report.json as `tailor eval` wrote it."""
    return await run_in_threadpool(console_of(request).report, run)


@router.get("/runs/report.html", response_class=HTMLResponse, responses=json_errors(400, 401, 403, 404, 429))
async def run_report_html(run: RunQuery, request: Request, caller: Caller = Depends(viewer)) -> str:
    """A run's eval/report.html: one self-contained page without scripts (the console shows it in a sandboxed
    frame)."""
    return await run_in_threadpool(console_of(request).report_html, run)


@router.get("/models", responses=READ)
async def models(request: Request, caller: Caller = Depends(viewer)) -> p.ModelsView:
    """Every registered version with its stage and lineage, and the running canaries."""
    return await run_in_threadpool(console_of(request).models)


@router.get("/models/{name}/versions/{version}", responses=errors(400, 401, 403, 404, 409, 429))
async def version(name: str, version: Id, request: Request, caller: Caller = Depends(viewer)) -> p.VersionDetail:
    """One version's lineage: data and artifact checksums, config, metrics, parent and children, audit log."""
    return await run_in_threadpool(console_of(request).version, name, version)


@router.get("/audit", responses=errors(401, 403, 404, 429))
async def audit(request: Request, caller: Caller = Depends(viewer), name: Annotated[str | None, Query(
        description="Only this model's changes.")] = None) -> list[p.AuditEntry]:
    """The registry's audit log, newest first: every stage change and canary share, who made it and why."""
    return await run_in_threadpool(console_of(request).audit, name)


@router.get("/diff", responses=errors(400, 401, 403, 404, 409, 429))
async def diff(old: Annotated[str, Query(pattern=REF, description="NAME@VERSION, e.g. city@1 or city@production.")],
               new: Annotated[str, Query(pattern=REF, description="NAME@VERSION, e.g. city@2.")],
               request: Request, caller: Caller = Depends(viewer)) -> p.VersionDiffView:
    """Lineage, config and metric differences between two versions."""
    return await run_in_threadpool(console_of(request).diff, old, new)


@router.post("/models/{name}/versions/{version}/promote", responses=errors(400, 401, 403, 404, 409, 413, 429))
async def promote(name: str, version: Id, body: p.PromoteRequest, request: Request,
                  caller: Caller = Depends(approver)) -> p.ChangeResult:
    """Move a version to a stage (approver); promoting to production archives the version there. A server that
    follows the registry serves it within one poll."""
    return await run_in_threadpool(console_of(request).promote, name, version, body.stage, who(caller), body.reason)


@router.post("/models/{name}/rollback", responses=errors(400, 401, 403, 404, 409, 413, 429))
async def rollback(name: str, body: p.RollbackRequest, request: Request,
                   caller: Caller = Depends(approver)) -> p.ChangeResult:
    """Put the previous production version back (approver); the current one is archived."""
    return await run_in_threadpool(console_of(request).rollback, name, who(caller), body.reason)


@router.post("/canaries/{canary_id}/share", responses=errors(400, 401, 403, 404, 409, 413, 429))
async def canary_share(canary_id: Id, body: p.ShareRequest, request: Request,
                       caller: Caller = Depends(approver)) -> p.CanaryResult:
    """Send another share of the model's users to a running canary (approver)."""
    return await run_in_threadpool(console_of(request).set_share, canary_id, body.share, who(caller), body.reason)


@router.get("/feedback", responses=errors(400, 401, 403, 429))
async def feedback_queue(request: Request, caller: Caller = Depends(viewer),
                         status: Annotated[Literal["pending", "accepted", "rejected", "all"], Query(
                             description="Which corrections.")] = "pending") -> p.FeedbackQueue:
    """The review queue: corrections users sent with a thumbs-down, newest first."""
    return await run_in_threadpool(console_of(request).queue, status)


@router.post("/feedback/{feedback_id}/review", responses=errors(400, 401, 403, 404, 409, 413, 429))
async def review(feedback_id: Id, body: p.ReviewRequest, request: Request,
                 caller: Caller = Depends(reviewer)) -> p.FeedbackItem:
    """Accept (optionally edited) or reject a correction (reviewer); `tailor improve` trains on accepted ones."""
    return await run_in_threadpool(console_of(request).review, feedback_id, body.decision, body.correction,
                                   who(caller), body.reason)


@router.get("/ab", responses=READ)
async def ab(request: Request, caller: Caller = Depends(viewer)) -> p.AbView:
    """A/B aliases and running canaries with their thumbs and significance tests."""
    return await run_in_threadpool(console_of(request).ab)


@router.get("/monitor", responses=errors(401, 403, 404, 429))
async def monitor(request: Request, caller: Caller = Depends(viewer), model: Annotated[str | None, Query(
        description="Only this model's series.")] = None) -> p.MonitorView:
    """The quality signals of /metrics over the last hour, one point per reading, each over the five minutes
    before it."""
    return await run_in_threadpool(console_of(request).monitor, model)
