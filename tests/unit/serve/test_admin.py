"""The operations console's API (/admin/api) in-process, on a workspace with three evaluated runs, a registry
(city@1 in production, city@2 a candidate, city@3 a candidate on a 10 % canary) and a feedback database with
corrections: roles allowed and refused, promote / rollback / canary share / review changing the registry and the
feedback database with the key's name and reason in the audit log, bad input as one 4xx naming the field, the A/B
figures equal to ab.py's, and the monitoring series following /metrics. No model: the console never decodes."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from tailor.config import ServeConfig, validate_config
from tailor.registry import Registry
from tailor.serve.ab import report as ab_report
from tailor.serve.app import create_app
from tailor.serve.feedback import FeedbackStore
from tailor.serve.security import create_key
from tailor.workspace import update_manifest, write_json

ROLES = ("chat", "viewer", "reviewer", "approver", "admin")
CORRECTIONS = [("When is the library open on Sundays?", "It is open on Sundays.", "The library is closed on Sundays."),
               ("How much is a parking permit?", "It is free.", "A parking permit costs $45 per year.")]


class NoModel:
    """Just enough engine for the app: the console reads the registry, the feedback database and the metrics."""

    tokenizer, base_name = None, "base"

    def model_names(self) -> list[str]:
        return ["base", "city"]

    def stats(self) -> dict:
        return {}

    def add_adapter(self, name: str, folder: str) -> None:  # what the registry watcher calls
        pass

    def remove_adapter(self, name: str) -> None:
        pass


def make_run(folder, token_f1: float, learning_rate: float, html: bool = True):
    """A run folder as train and eval leave it, with a stand-in adapter file: the registry only reads files."""
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(f"weights {token_f1}".encode())
    update_manifest(folder, "train", config={"base_model": "tiny", "train": {"learning_rate": learning_rate}},
                    metrics={"train_loss": 1 - token_f1}, extra={"method": "lora", "base_model": "tiny"})
    write_json(folder / "eval" / "report.json", {
        "created_at": f"2026-11-2{round(token_f1 * 10)}T10:00:00+00:00", "method": "lora", "n_questions": 98,
        "models": {"base": {"token_f1": 0.1}, "lora": {"token_f1": token_f1}}, "token_f1_gain": token_f1 - 0.1})
    if html:
        (folder / "eval" / "report.html").write_text(f"<!DOCTYPE html><h1>Evaluation of {folder.name}</h1>")
    return folder


@pytest.fixture
def workspace(tmp_path):
    runs = [make_run(tmp_path / "run", 0.3, 1e-4), make_run(tmp_path / "improve" / "cycle-0001", 0.45, 5e-4),
            make_run(tmp_path / "improve" / "cycle-0002", 0.5, 5e-4, html=False)]
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.register_run(runs[0], "city", by="ana", reason="first")
    registry.promote("city", 1, "production", by="ana", reason="launch")
    registry.register_run(runs[1], "city", "city@1", by="improve")
    registry.register_run(runs[2], "city", "city@1", by="improve")
    registry.start_canary("city", 3, 0.1, by="improve", reason="cycle 2")
    store = FeedbackStore(tmp_path / "feedback.db")
    for i, (question, answer, correction) in enumerate(CORRECTIONS):
        store.record_completion(id=f"c{i}", model="city", alias=None, endpoint="chat", answer=answer, user=None,
                                prompt=[{"role": "user", "content": question}], latency_ms=100.0,
                                first_token_ms=20.0, completion_tokens=8)
        store.add_feedback(response_id=f"c{i}", rating="down", correction=correction)
    # the canary: production up-voted, the candidate down-voted, far more often than chance would
    for i in range(40):
        model = "city@3" if i % 2 else "city"
        store.record_completion(id=f"a{i}", model=model, alias="city", endpoint="chat", answer="…", user=f"u{i}",
                                prompt=[{"role": "user", "content": "Hi?"}], latency_ms=100.0 + i,
                                first_token_ms=20.0, completion_tokens=4)
        store.add_feedback(response_id=f"a{i}", rating="down" if model == "city@3" else "up")
    store.close()
    keys = {role: create_key(tmp_path / "keys.json", f"ops-{role}", [role]) for role in ROLES}
    config = ServeConfig(api_key_file="keys.json", rate_limit="10000/minute", request_log="logs/requests.jsonl",
                         aliases={"city-bot": {"base": 1, "city": 1}})
    app = create_app(NoModel(), config, root=tmp_path, registry=registry)  # type: ignore[arg-type]
    return TestClient(app), keys, registry, tmp_path


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def stages(registry) -> dict[int, str]:
    return {version.version: version.stage for version in registry.versions("city")}


# the least role each route needs; the writes name things that do not exist, so an allowed call ends in a 404
ROUTES = [
    ("GET", "/admin/api/me", None, "viewer", 200),
    ("GET", "/admin/api/runs", None, "viewer", 200),
    ("GET", "/admin/api/models", None, "viewer", 200),
    ("GET", "/admin/api/feedback", None, "viewer", 200),
    ("GET", "/admin/api/ab", None, "viewer", 200),
    ("GET", "/admin/api/monitor", None, "viewer", 200),
    ("GET", "/admin/api/diff?old=city@1&new=city@2", None, "viewer", 200),
    ("POST", "/admin/api/feedback/99/review", {"decision": "accepted", "reason": "checked"}, "reviewer", 404),
    ("POST", "/admin/api/models/city/versions/99/promote", {"stage": "staging", "reason": "ok"}, "approver", 404),
    ("POST", "/admin/api/models/nobody/rollback", {"reason": "bad answers"}, "approver", 404),
    ("POST", "/admin/api/canaries/99/share", {"share": 0.5, "reason": "more traffic"}, "approver", 404),
]


@pytest.mark.parametrize(("method", "path", "body", "least", "allowed_status"), ROUTES,
                         ids=[f"{method} {path.split('?')[0]}" for method, path, *_ in ROUTES])
def test_each_role_is_allowed_what_it_may_and_refused_the_rest(workspace, method, path, body, least, allowed_status):
    client, keys, registry, _ = workspace
    anonymous = client.request(method, path, json=body)
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
    assert anonymous.json()["error"]["code"] == "invalid_api_key"
    rank = ("viewer", "reviewer", "approver")
    for role, key in keys.items():
        answer = client.request(method, path, json=body, headers=auth(key))
        allowed = role == "admin" or (role in rank and rank.index(role) >= rank.index(least))
        if allowed:
            assert answer.status_code == allowed_status, (role, answer.text)
        else:
            assert answer.status_code == 403, (role, answer.text)
            assert answer.json()["error"] == {"message": f"this key lacks the '{least}' scope",
                                              "type": "permission_error", "param": None,
                                              "code": "insufficient_scope"}
    assert stages(registry) == {1: "production", 2: "candidate", 3: "staging"}  # nothing refused changed anything


def test_me_says_what_the_role_allows(workspace):
    client, keys, _, _ = workspace
    seen = {role: client.get("/admin/api/me", headers=auth(keys[role])).json() for role in ROLES[1:]}
    assert {role: (me["can_review"], me["can_approve"]) for role, me in seen.items()} == {
        "viewer": (False, False), "reviewer": (True, False), "approver": (True, True), "admin": (True, True)}
    assert seen["reviewer"]["name"] == "ops-reviewer" and seen["reviewer"]["scopes"] == ["reviewer"]


def test_promote_and_rollback_change_the_registry_and_name_the_key_in_the_audit_log(workspace):
    client, keys, registry, root = workspace
    promoted = client.post("/admin/api/models/city/versions/2/promote", headers=auth(keys["approver"]),
                           json={"stage": "production", "reason": "better on the corrected questions"})
    assert promoted.status_code == 200, promoted.text
    assert [(c["version"], c["action"], c["to_stage"]) for c in promoted.json()["changes"]] == [
        ("city@1", "demote", "archived"), ("city@2", "promote", "production")]
    assert (stages(registry)[1], stages(registry)[2]) == ("archived", "production")
    last = registry.history("city")[-1]
    assert (last.version.label, last.action, last.changed_by, last.reason) == (
        "city@2", "promote", "ops-approver", "better on the corrected questions")

    rolled = client.post("/admin/api/models/city/rollback", headers=auth(keys["approver"]),
                         json={"reason": "residents complain about opening hours"})
    assert rolled.status_code == 200, rolled.text
    assert (stages(registry)[1], stages(registry)[2]) == ("production", "archived")
    rows = registry.history("city")[-2:]
    assert [(r.version.label, r.action, r.to_stage, r.changed_by, r.reason) for r in rows] == [
        ("city@2", "rollback", "archived", "ops-approver", "residents complain about opening hours"),
        ("city@1", "rollback", "production", "ops-approver", "residents complain about opening hours")]
    assert [c["id"] for c in rolled.json()["changes"]] == [r.id for r in rows]
    logged = [json.loads(line) for line in (root / "logs" / "requests.jsonl").read_text().splitlines()]
    changes = [(line["action"], line["target"], line["key"]) for line in logged if line.get("event") == "admin"]
    assert changes == [("promote", "city@2", "ops-approver"), ("rollback", "city", "ops-approver")]
    audit = client.get("/admin/api/audit?name=city", headers=auth(keys["viewer"])).json()
    assert audit[0]["id"] == rows[-1].id and audit[0]["by"] == "ops-approver"  # newest first


def test_reviews_go_through_the_feedback_store_and_feed_improve(workspace):
    from tailor.improve.collect import collect

    client, keys, registry, root = workspace
    queue = client.get("/admin/api/feedback", headers=auth(keys["viewer"])).json()
    assert queue["counts"] == {"pending": 2, "accepted": 0, "rejected": 0}
    assert [item["question"] for item in queue["items"]] == [q for q, _, _ in reversed(CORRECTIONS)]  # newest first
    first, second = sorted(item["id"] for item in queue["items"])
    edited = client.post(f"/admin/api/feedback/{first}/review", headers=auth(keys["reviewer"]), json={
        "decision": "accepted", "correction": "The library is closed on Sundays and holidays.",
        "reason": "checked the opening hours page"})
    assert edited.status_code == 200, edited.text
    rejected = client.post(f"/admin/api/feedback/{second}/review", headers=auth(keys["reviewer"]),
                           json={"decision": "rejected", "reason": "the permit price changed"})
    assert rejected.json()["review"] == "rejected"
    store = FeedbackStore(root / "feedback.db")
    rows = {row["id"]: row for row in store.rows("f.correction IS NOT NULL")}
    store.close()
    assert {key: rows[first][key] for key in ("review", "reviewed_correction", "reviewed_by", "review_note")} == {
        "review": "accepted", "reviewed_correction": "The library is closed on Sundays and holidays.",
        "reviewed_by": "ops-reviewer", "review_note": "checked the opening hours page"}
    assert (rows[second]["review"], rows[second]["reviewed_by"]) == ("rejected", "ops-reviewer")
    # what the next `tailor improve` trains on: the accepted, edited correction, and nothing rejected
    found = collect(validate_config({"base_model": "tiny"}), registry, "city", registry.resolve("city@production"),
                    root / "feedback.db")
    assert [(c["feedback_id"], c["correction"]) for c in found.corrections] == [
        (first, "The library is closed on Sundays and holidays.")]
    assert client.get("/admin/api/feedback", headers=auth(keys["viewer"])).json()["counts"] == {
        "pending": 0, "accepted": 1, "rejected": 1}


def test_a_canary_share_change_is_audited_and_followed_by_the_server(workspace):
    from tailor.serve.registry_watch import RegistryWatcher

    client, keys, registry, _ = workspace
    watcher = RegistryWatcher(NoModel(), registry)  # type: ignore[arg-type]
    watched = create_app(NoModel(), ServeConfig(feedback_db=":memory:", request_log=None),  # type: ignore[arg-type]
                         watcher=watcher)
    aliases = watched.state.services.aliases
    assert aliases.aliases["city"] == [("city", 0.9), ("city@3", 0.1)]
    canary = registry.active_canaries()[0]
    changed = client.post(f"/admin/api/canaries/{canary.id}/share", headers=auth(keys["approver"]),
                          json={"share": 0.25, "reason": "no complaints in a week"})
    assert changed.status_code == 200, changed.text
    assert registry.active_canaries()[0].share == 0.25
    row = registry.history(version_id=canary.candidate_id)[-1]
    assert (row.action, row.changed_by, row.reason) == ("share", "ops-approver",
                                                        "canary share 10% → 25%: no complaints in a week")
    watcher.sync()  # the server's next poll
    assert aliases.aliases["city"] == [("city", 0.75), ("city@3", 0.25)]
    again = client.post(f"/admin/api/canaries/{canary.id}/share", headers=auth(keys["approver"]),
                        json={"share": 0.25, "reason": "again"})
    assert again.status_code == 409 and again.json()["error"]["param"] == "share"


def snapshot(registry, root) -> tuple:
    store = FeedbackStore(root / "feedback.db")
    reviews = [(row["review"], row["reviewed_correction"]) for row in store.rows()]
    store.close()
    return stages(registry), len(registry.history("city")), registry.active_canaries()[0].share, reviews


BAD = [  # (path, body, status, the field the error names)
    ("/admin/api/models/city/versions/2/promote", {"stage": "prod", "reason": "x"}, 400, "stage"),
    ("/admin/api/models/city/versions/2/promote", {"stage": "staging"}, 400, "reason"),
    ("/admin/api/models/city/versions/2/promote", {"stage": "staging", "reason": "   "}, 400, "reason"),
    ("/admin/api/models/city/versions/2/promote", {"stage": "staging", "reason": "x", "by": "me"}, 400, "by"),
    ("/admin/api/models/city/versions/0/promote", {"stage": "staging", "reason": "x"}, 400, "version"),
    ("/admin/api/models/city/versions/7/promote", {"stage": "staging", "reason": "x"}, 404, "version"),
    ("/admin/api/models/town/versions/1/promote", {"stage": "staging", "reason": "x"}, 404, "name"),
    ("/admin/api/models/city/versions/1/promote", {"stage": "production", "reason": "x"}, 409, "stage"),
    ("/admin/api/models/city/versions/3/promote", {"stage": "candidate", "reason": "x"}, 409, "stage"),
    ("/admin/api/models/town/rollback", {"reason": "x"}, 404, "name"),
    ("/admin/api/models/city/rollback", {"reason": "x"}, 409, "name"),  # nothing earlier in production
    ("/admin/api/canaries/1/share", {"share": 1.5, "reason": "x"}, 400, "share"),
    ("/admin/api/canaries/1/share", {"share": "lots", "reason": "x"}, 400, "share"),
    ("/admin/api/canaries/42/share", {"share": 0.5, "reason": "x"}, 404, "canary_id"),
    ("/admin/api/feedback/1/review", {"decision": "maybe", "reason": "x"}, 400, "decision"),
    ("/admin/api/feedback/1/review", {"decision": "accepted", "correction": " ", "reason": "x"}, 400, "correction"),
    ("/admin/api/feedback/1/review", {"decision": "rejected", "correction": "y", "reason": "x"}, 400, "correction"),
    ("/admin/api/feedback/3/review", {"decision": "accepted", "reason": "x"}, 404, "feedback_id"),  # a thumb only
    ("/admin/api/feedback/abc/review", {"decision": "accepted", "reason": "x"}, 400, "feedback_id"),
]


@pytest.mark.parametrize(("path", "body", "status", "field"), BAD, ids=[f"{p} {f} {s}" for p, _, s, f in BAD])
def test_bad_input_is_one_clear_error_naming_the_field_and_changes_nothing(workspace, path, body, status, field):
    client, keys, registry, root = workspace
    before = snapshot(registry, root)
    answer = client.post(path, json=body, headers=auth(keys["admin"]))
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == field and error["message"].startswith(f"{field}:"), error
    if status == 400:  # one problem, not "a: ...; b: ..." listing every member of a union
        assert ";" not in error["message"], error
    assert snapshot(registry, root) == before


@pytest.mark.parametrize(("query", "status", "field"), [
    ("/admin/api/diff?old=city@1&new=city@9", 404, "new"),
    ("/admin/api/diff?old=city-1&new=city@2", 400, "old"),
    ("/admin/api/models/city/versions/9", 404, "version"),
    ("/admin/api/runs/report?run=nowhere", 404, "run"),
    ("/admin/api/runs/report.html?run=improve/cycle-0002", 404, "run"),  # evaluated without the html page
    ("/admin/api/runs/report?run=../../etc", 404, "run"),
    ("/admin/api/monitor?model=gpt-9", 404, "model"),
    ("/admin/api/feedback?status=done", 400, "status"),
])
def test_bad_queries_name_the_field(workspace, query, status, field):
    client, keys, _, _ = workspace
    answer = client.get(query, headers=auth(keys["viewer"]))
    assert answer.status_code == status and answer.json()["error"]["param"] == field, answer.text


def test_runs_list_their_reports_and_registered_versions(workspace):
    client, keys, _, root = workspace
    runs = client.get("/admin/api/runs", headers=auth(keys["viewer"])).json()["runs"]
    assert [(r["id"], r["token_f1"], r["versions"], r["has_html"]) for r in runs] == [
        ("improve/cycle-0002", 0.5, ["city@3"], False), ("improve/cycle-0001", 0.45, ["city@2"], True),
        ("run", 0.3, ["city@1"], True)]
    report = client.get("/admin/api/runs/report?run=run", headers=auth(keys["viewer"])).json()
    assert report == json.loads((root / "run" / "eval" / "report.json").read_text())
    page = client.get("/admin/api/runs/report.html?run=improve/cycle-0001", headers=auth(keys["viewer"]))
    assert page.headers["content-type"].startswith("text/html") and "Evaluation of cycle-0001" in page.text


def test_version_lineage_and_diff(workspace):
    client, keys, _, _ = workspace
    version = client.get("/admin/api/models/city/versions/1", headers=auth(keys["viewer"])).json()
    assert (version["stage"], version["parent"], version["children"], version["run"]) == (
        "production", None, ["city@2", "city@3"], "run")
    assert version["artifacts"] == {"adapter/adapter_model.safetensors": version["artifacts"][
        "adapter/adapter_model.safetensors"]} and len(version["artifacts"]["adapter/adapter_model.safetensors"]) == 64
    assert [(h["action"], h["by"]) for h in version["history"]] == [("register", "ana"), ("promote", "ana")]
    diff = client.get("/admin/api/diff?old=city@1&new=city@2", headers=auth(keys["viewer"])).json()
    assert {row["key"]: (row["old"], row["new"]) for row in diff["config"]} == {
        "train.learning_rate": ("0.0001", "0.0005")}
    assert {row["key"]: row["change"] for row in diff["metrics"]}["eval.lora.token_f1"] == pytest.approx(0.15)
    assert {row["key"]: row["new"] for row in diff["lineage"]}["parent"] == "city@1"


def test_ab_and_canary_figures_are_the_ones_ab_py_computes(workspace):
    from tailor.improve.decide import ab_counts

    client, keys, registry, root = workspace
    view = client.get("/admin/api/ab", headers=auth(keys["viewer"])).json()
    (canary,) = view["canaries"]
    expected = ab_counts(root / "feedback.db", registry.active_canaries()[0])
    assert canary["fisher_p"] == expected["fisher_p"] and canary["fisher_p"] < 0.001  # 20/0 up vs 0/20
    assert (canary["production"]["up"], canary["canary"]["down"], canary["share"]) == (20, 20, 0.1)
    assert [(a["name"], a["split"]) for a in view["aliases"]] == [
        ("city-bot", [{"model": "base", "share": 0.5}, {"model": "city", "share": 0.5}])]
    assert ab_report(root / "feedback.db")["city"]  # the canary's alias: shown as the canary, not twice


def test_monitor_series_follow_the_servers_metrics(workspace):
    client, keys, _, _ = workspace
    metrics = client.app.state.services.metrics  # type: ignore[attr-defined]
    for rating in ("down", "down", "up", "up"):
        metrics.feedback.labels("city", rating).inc()
    metrics.feedback.labels("base", "up").inc()
    for seconds in (0.2, 0.2, 0.2, 4.0):
        metrics.latency.labels("city", "chat").observe(seconds)
    client.app.state.console.history.sample()  # type: ignore[attr-defined]
    view = client.get("/admin/api/monitor", headers=auth(keys["viewer"])).json()
    assert len(view["times"]) == 2 and set(view["values"]) == set(view["signals"])  # the reading and now
    assert view["values"]["thumbs_down_rate"] == [0.4, 0.4]  # 2 of 5 thumbs
    assert 0.1 < view["values"]["latency_p50_seconds"][-1] <= 0.25 < 2.5 < view["values"]["latency_p95_seconds"][-1]
    assert view["values"]["abstention_rate"][-1] is None  # no grounded answers: no data, not 0
    city = client.get("/admin/api/monitor?model=city", headers=auth(keys["viewer"])).json()
    assert city["values"]["thumbs_down_rate"][-1] == 0.5 and city["model"] == "city"


def test_the_console_page_is_one_offline_file(workspace):
    client, _, _, _ = workspace
    page = client.get("/admin")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/admin/api" in page.text and "<svg" not in page.text.split("<script>")[0]  # graphs are drawn by the JS
    assert "http://" not in page.text.replace("http://www.w3.org/2000/svg", "") and "https://" not in page.text
    assert "<script src" not in page.text  # nothing loaded from elsewhere
    assert re.findall(r"<link [^>]*>", page.text) == ['<link rel="icon" href="data:,">']


def test_the_console_is_documented_in_the_openapi_schema(workspace):
    client, _, _, _ = workspace
    paths = client.get("/openapi.json").json()["paths"]
    promote = paths["/admin/api/models/{name}/versions/{version}/promote"]["post"]
    assert sorted(promote["responses"]) == ["200", "400", "401", "403", "404", "409", "413", "429"]
    assert "text/html" in paths["/admin/api/runs/report.html"]["get"]["responses"]["200"]["content"]
    assert "/admin" not in paths  # the page itself is not an API route


def test_keys_command_creates_role_keys(tmp_path):
    from typer.testing import CliRunner

    from tailor.cli.app import app
    from tailor.serve.security import KeyStore

    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "lena", "--scope", "reviewer", "-f", str(tmp_path / "k.json")])
    assert created.exit_code == 0, created.output
    key = KeyStore.load(tmp_path / "k.json").find(created.output.strip().splitlines()[-1])
    assert key is not None and key.scopes == ("reviewer",)
    assert key.allows("viewer") and key.allows("reviewer") and not key.allows("approver") and not key.allows("chat")
    wrong = runner.invoke(app, ["keys", "create", "x", "--scope", "owner", "-f", str(tmp_path / "k.json")])
    # in-process the TailorError reaches the runner (main() prints it as one line)
    assert "one or more of chat, admin, viewer, reviewer, approver (found owner)" in str(wrong.exception)


def test_without_keys_changes_are_recorded_under_the_clients_address(workspace):
    _, _, registry, root = workspace
    local = TestClient(create_app(NoModel(), ServeConfig(feedback_db=":memory:", request_log=None),  # type: ignore[arg-type]
                                  root=root, registry=registry))
    assert local.get("/admin/api/me").json() == {"name": "ip:testclient", "scopes": ["admin"], "can_review": True,
                                                 "can_approve": True}
    promoted = local.post("/admin/api/models/city/versions/2/promote", json={"stage": "staging", "reason": "try it"})
    assert promoted.status_code == 200, promoted.text
    assert registry.history("city")[-1].changed_by == "ip:testclient"
