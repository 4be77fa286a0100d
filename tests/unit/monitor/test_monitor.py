"""Alerting rules, dashboard and `tailor monitor`: promtool (Debian's prometheus package, `make promtool`) checks and
unit-tests deploy/prometheus/alerts.yml; every rule is inside the PromQL subset tailor monitor evaluates and, like
every expression of deploy/grafana/tailor.json, reads only metrics a real server exports; `tailor monitor check`
fires on a real server's thumbs (totals since start, between two scrapes, and from the feedback database) and posts
to a real local webhook; bad input is one line and exit 2; `tailor monitor drift` clusters unanswered questions with
the real embedding model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from tailor.cli.app import app
from tailor.config import DEFAULT_ABSTAIN_ANSWER, ServeConfig
from tailor.errors import TailorError
from tailor.monitor.check import Scrape, ScrapeSource, check, scrape
from tailor.monitor.promql import histogram_quantile, parse
from tailor.monitor.rules import DEFAULT_RULES, check_metrics, load_rules
from tailor.serve.engine import Engine
from tailor.serve.feedback import FeedbackStore
from tests.unit.helpers import start_server

ROOT = Path(__file__).resolve().parents[3]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "tailor.json"
RULE_NAMES = {"TailorThumbsDownRateHigh", "TailorAbstentionRateHigh", "TailorRetrievalMissesHigh",
              "TailorLatencyP95High", "TailorTimeToFirstTokenP95High", "TailorErrorRateHigh", "TailorRateLimitStorm",
              "TailorPromptInjectionAttempts", "TailorBlockedInputsHigh"}
runner = CliRunner()


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:  # a missing checker must not pass as green
        pytest.fail("promtool is not installed: run `make promtool` (Debian's prometheus package)")
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rules_and_their_unit_tests_pass():
    checked = promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert checked.returncode == 0 and "SUCCESS: 9 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_promtool_unit_tests_catch_a_wrong_threshold(tmp_path):
    """The unit tests are not vacuous: with the error-rate threshold at 50% the city's 17% no longer fires."""
    rules = (PROMETHEUS / "alerts.yml").read_text()
    assert rules.count("> 0.05") == 1
    (tmp_path / "alerts.yml").write_text(rules.replace("> 0.05", "> 0.5"))
    shutil.copy(PROMETHEUS / "alerts_test.yml", tmp_path)
    tested = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert tested.returncode != 0 and "TailorErrorRateHigh" in tested.stdout + tested.stderr


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    engine = Engine(tiny_model_dir, dtype=torch.float32, max_new_tokens=4)
    root = tmp_path_factory.mktemp("monitor")
    config = ServeConfig(feedback_db="feedback.db", request_log=None, rate_limit="10000/minute")
    server, url = start_server(engine, config=config, root=root)
    yield url, root / "feedback.db"
    server.should_exit = True
    engine.shutdown()


def test_every_rule_is_in_the_evaluated_subset_and_reads_exported_metrics(server, tmp_path):
    url, _ = server
    rules = load_rules(DEFAULT_RULES)  # a rule outside the subset would raise here, naming it
    assert {rule.name for rule in rules} == RULE_NAMES
    for rule in rules:
        assert rule.wait > 0 and rule.severity in ("info", "warning", "critical") and rule.summary, rule.name
    exported = scrape(f"{url}/metrics").exported
    check_metrics(rules, exported, url)
    assert {"tailor_feedback_total", "tailor_request_duration_seconds_bucket", "tailor_rate_limited_total",
            "tailor_abstentions_total", "tailor_prompt_injection_attempts_total"} <= exported
    with pytest.raises(TailorError, match=r"TailorX\): reads tailor_nope_total, which .* does not export"):
        check_metrics(load_rules(write_rules(tmp_path, "sum by (model) (rate(tailor_nope_total[5m])) > 1")),
                      exported, url)


PROMQL_WORDS = {"sum", "by", "without", "rate", "increase", "histogram_quantile", "avg", "max", "min", "count",
                "and", "or", "unless", "on", "ignoring", "label_values", "irate", "delta", "topk", "bottomk"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers left once strings, label matchers, grouping clauses,
    ranges, variables and PromQL's own words are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*\w+\s*\)", r"\1", expr)
    return {name for name in re.findall(r"\b[a-zA-Z_:][\w:]*\b", expr) if name not in PROMQL_WORDS
            and not re.fullmatch(r"\d.*|e", name)}


def test_dashboard_reads_only_exported_metrics_and_covers_every_signal(server):
    url, _ = server
    dashboard = json.loads(DASHBOARD.read_text())
    exported = scrape(f"{url}/metrics").exported
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    model_variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "model")
    expressions.append(model_variable["query"]["query"])
    read = set().union(*(metric_names(expr) for expr in expressions))
    assert read <= exported, f"the dashboard reads metrics tailor does not export: {sorted(read - exported)}"
    rule_metrics = set().union(*(rule.alert.metrics for rule in load_rules(DEFAULT_RULES)))
    assert rule_metrics <= read  # a graph for every signal an alert watches
    assert all('model=~"$model"' in expr for expr in expressions if "{model}" in expr and "errors" not in expr)
    assert metric_names('sum by (model) (rate(foo_total{a="b"}[5m])) / on (x) bar') == {"foo_total", "bar"}


def metrics_text(**counts: float) -> str:
    lines = ["# TYPE tailor_feedback counter", "# TYPE tailor_start_time_seconds gauge",
             "tailor_start_time_seconds 1000"]
    for key, value in counts.items():
        model, rating = key.split("_")
        lines.append(f'tailor_feedback_total{{model="{model}",rating="{rating}"}} {value}')
    return "\n".join(lines) + "\n"


def test_the_evaluator_agrees_with_promtool_and_measures_between_two_scrapes():
    # promtool's unit test finds 4.875 s for this histogram (alerts_test.yml, time to first token)
    assert histogram_quantile(0.95, [(2.5, 0), (5, 10), (float("inf"), 10)]) == pytest.approx(4.875)
    assert histogram_quantile(0.5, [(0.25, 10), (5, 10), (float("inf"), 10)]) == pytest.approx(0.125)
    rules = [rule for rule in load_rules(DEFAULT_RULES) if rule.name == "TailorThumbsDownRateHigh"]
    first = Scrape.parse(metrics_text(city_down=5, city_up=5, base_up=100), 2000, "first")
    # 12 new thumbs for city (6 down), base restarted (its counter went down: all 20 are new, none down)
    last = Scrape.parse(metrics_text(city_down=11, city_up=11, base_up=20, base_down=0), 2060, "last")
    rows = {row.series: row for row in check(rules, ScrapeSource(last, first))}
    assert rows["model=city"].value == pytest.approx(0.5) and rows["model=city"].firing
    assert rows["model=base"].value == 0 and not rows["model=base"].firing
    # since start: city 11 of 22 down but base now has 20 up: the same verdicts from totals
    rows = {row.series: row for row in check(rules, ScrapeSource(last))}
    assert rows["model=city"].firing and not rows["model=base"].firing
    # under the 10-thumb floor nothing fires, however bad the ratio
    few = Scrape.parse(metrics_text(city_down=3), 2000, "few")
    assert not any(row.firing for row in check(rules, ScrapeSource(few)))
    with pytest.raises(ValueError, match="rate\\(\\.\\.\\.\\) and increase"):
        parse("sum by (model) (irate(tailor_feedback_total[5m])) > 1")
    with pytest.raises(ValueError, match="group by different labels"):
        parse("sum by (model) (rate(tailor_errors_total[5m])) / sum by (key) (rate(tailor_rate_limited_total[5m])) > 1")


def write_rules(folder: Path, expr: str, name: str = "TailorX") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "g", "rules": [
        {"alert": name, "expr": expr, "for": "1m", "labels": {"severity": "warning"},
         "annotations": {"summary": "x"}}]}]}))
    return path


def monitor(*args: str):
    return runner.invoke(app, ["monitor", "check", *args], env={"COLUMNS": "200"})


def test_bad_input_is_one_line_and_exit_2(server, tmp_path):
    url, _ = server
    (tmp_path / "broken.yml").write_text("groups: [")
    for args, message in [
        (["--url", url, "--rules", str(tmp_path / "missing.yml")], "missing.yml: cannot read the rules file"),
        (["--url", "http://127.0.0.1:9"], "http://127.0.0.1:9/metrics: cannot read metrics"),
        (["--url", "ftp://x"], r"--url: 'ftp://x' is not an http\(s\) URL"),
        (["--url", url, "--rules", str(write_rules(tmp_path / "a", "avg(rate(tailor_errors_total[5m])) > 1"))],
         r"groups\[0\].rules\[0\] \(TailorX\): expected sum but found 'avg'"),
        (["--url", url, "--rules", str(write_rules(tmp_path / "b", "sum(rate(tailor_nope_total[5m])) > 1"))],
         r"\(TailorX\): reads tailor_nope_total, which .* does not export"),
        (["--url", url, "--feedback-db", str(tmp_path / "none.db")], "none.db: no feedback database"),
        (["--url", url, "--rules", str(tmp_path / "broken.yml")], "broken.yml: not valid YAML"),
    ]:
        result = monitor(*args)  # in-process the TailorError reaches the runner; `tailor` prints it (below)
        assert isinstance(result.exception, TailorError) and re.search(message, str(result.exception)), \
            (message, result.output)
        assert result.exception.exit_code == 2
    # the command itself: one line on stderr, no traceback, exit 2 (1 is kept for "an alert fires")
    process = subprocess.run([str(Path(sys.executable).with_name("tailor")), "monitor", "check", "--url",
                              "http://127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    assert process.returncode == 2 and "Traceback" not in process.stderr
    assert process.stderr.strip().startswith("error: http://127.0.0.1:9/metrics: cannot read metrics")


class Webhook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):
        Webhook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    Webhook.received = []
    hook = HTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{hook.server_address[1]}/hook", Webhook.received
    hook.shutdown()


def ask(url: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "base", "messages": [{"role": "user", "content": f"Question {i}?"}], "max_tokens": 2})
        assert reply.status_code == 200
        ids.append(reply.json()["id"])
    return ids


def thumbs(url: str, ids: list[str], rating: str) -> None:
    for response_id in ids:
        assert httpx.post(f"{url}/v1/feedback", json={"response_id": response_id, "rating": rating}).status_code == 200


def test_monitor_fires_on_thumbs_down_and_posts_the_alerts(server, webhook):
    url, feedback_db = server
    hook, received = webhook
    healthy = monitor("--url", url, "--webhook", hook)
    assert healthy.exit_code == 0, healthy.output
    assert "TailorThumbsDownRateHigh" in healthy.output and "no data" in healthy.output and not received

    ids = ask(url, 14)
    thumbs(url, ids[:2], "up")
    # between two scrapes: 12 thumbs down arrive while the monitor waits
    later = threading.Timer(0.3, thumbs, (url, ids[2:], "down"))
    later.start()
    fired = monitor("--url", url, "--interval", "1.5", "--webhook", hook, "--json")
    later.join()
    assert fired.exit_code == 1, fired.output
    rows = json.loads(fired.output)
    thumbs_rows = [row for row in rows if row["alert"] == "TailorThumbsDownRateHigh"]
    assert thumbs_rows == [{**thumbs_rows[0], "series": "model=base", "value": 1.0, "state": "firing"}]
    assert [(a["alert"], a["series"], a["severity"]) for a in received[0]["firing"]] == [
        ("TailorThumbsDownRateHigh", "model=base", "warning")]
    assert received[0]["server"] == f"{url}/metrics" and "thumbs are down" in received[0]["firing"][0]["summary"]

    # nothing new between two scrapes: no data, no alert, though the totals since start would fire
    quiet = monitor("--url", url, "--interval", "0.5")
    assert quiet.exit_code == 0, quiet.output
    since_start = monitor("--url", url)
    assert since_start.exit_code == 1 and "firing: TailorThumbsDownRateHigh" in since_start.output
    # from the feedback database over the rule's hour: 12 down of 14
    stored = monitor("--url", url, "--feedback-db", str(feedback_db), "--json")
    row = next(r for r in json.loads(stored.output)
               if r["alert"] == "TailorThumbsDownRateHigh")
    assert stored.exit_code == 1 and row["value"] == pytest.approx(12 / 14) and row["state"] == "firing"
    assert len(received) == 1  # --webhook was only given to the run that fired


QUESTIONS = {  # topic -> questions the model could not answer
    "parking": ["How do I get a residential parking permit?", "Where can I apply for a parking permit for my street?",
                "What does a residential parking permit cost?"],
    "pool": ["When does the public swimming pool open in summer?", "What are the swimming pool opening hours?",
             "Is the city swimming pool open on Sundays?"],
}


def test_drift_clusters_the_questions_that_were_not_answered(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    n = 0

    def answer(question: str, text: str) -> str:
        nonlocal n
        n += 1
        store.record_completion(id=f"c{n}", model="city", alias=None, endpoint="chat",
                                prompt=[{"role": "user", "content": question}], answer=text, user=None,
                                latency_ms=1.0, first_token_ms=1.0, completion_tokens=3)
        return f"c{n}"

    for question in QUESTIONS["parking"]:
        answer(question, DEFAULT_ABSTAIN_ANSWER)  # abstained
    for question in QUESTIONS["pool"]:
        store.add_feedback(response_id=answer(question, "The pool is a place."), rating="down")
    answer("Where is City Hall?", "City Hall is at 400 Linden Avenue.")  # answered: not drift
    store.add_feedback(response_id=answer("What is the address of City Hall?", "400 Linden Avenue."), rating="up")
    store.close()

    result = runner.invoke(app, ["monitor", "drift", "--db", str(tmp_path / "feedback.db"), "--json",
                                 "-w", str(tmp_path)])
    assert result.exit_code == 0, result.output
    topics = json.loads(result.stdout)  # stderr: the embedder's loading bar
    assert sorted(sorted(t["examples"]) for t in topics) == sorted(sorted(q) for q in QUESTIONS.values())
    by_size = {tuple(sorted(t["examples"])): t for t in topics}
    parking = by_size[tuple(sorted(QUESTIONS["parking"]))]
    pool = by_size[tuple(sorted(QUESTIONS["pool"]))]
    assert (parking["abstained"], parking["thumbs_down"]) == (3, 0)
    assert (pool["abstained"], pool["thumbs_down"]) == (0, 3)
    assert "park" in parking["label"] and "pool" in pool["label"]  # stemmed content words
    table = runner.invoke(app, ["monitor", "drift", "--db", str(tmp_path / "feedback.db"), "-w", str(tmp_path)],
                          env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "residential parking permit" in table.output
