"""The operations console (/admin) in headless Chromium (Playwright, Debian's /usr/bin/chromium) against a real
`tailor serve --registry` subprocess on the tiny model, in a workspace with three evaluated runs registered as
city@1 (production), city@2 (candidate) and city@3 (a 20 % canary): an approver signs in with a key, sees every
screen, accepts an edited correction and promotes city@2, and both changes land in the feedback database and the
registry's audit log under the key's name; a viewer's key sees the same screens without the actions.

Screenshots of every screen go to $TAILOR_SCREENSHOTS (default: the test's temporary folder)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tailor.evaluate.report import write_html_report
from tailor.registry import Registry
from tailor.serve.feedback import FeedbackStore
from tailor.serve.security import create_key
from tailor.workspace import write_json
from tests.unit.helpers import wait_until_healthy
from tests.unit.serve.test_registry_serving import make_run

pytestmark = pytest.mark.browser
CHROMIUM = os.environ.get("TAILOR_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
QUESTION = "When is the library open on Sundays?"
CORRECTION = "The library is closed on Sundays."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evaluated(folder: Path, token_f1: float, day: int) -> Path:
    """The eval report `tailor eval` would leave: report.json and the HTML page with its plots."""
    report = {"created_at": f"2026-11-{day:02d}T10:00:00+00:00", "method": "lora", "n_questions": 2,
              "eval_file": str(folder / "data" / "eval.jsonl"), "bleu_signature": "nrefs:1",
              "models": {"base": {"token_f1": 0.12, "exact_match": 0.0, "rouge_l": 0.1, "bleu": 0.02},
                         "lora": {"token_f1": token_f1, "exact_match": 0.0, "rouge_l": token_f1, "bleu": 0.1}},
              "token_f1_gain": round(token_f1 - 0.12, 4)}
    write_json(folder / "eval" / "report.json", report)
    predictions = [{"model": model, "source": "city.jsonl:1", "question": QUESTION, "reference": CORRECTION,
                    "prediction": "It opens at 9.", "token_f1": 0.1, "rouge_l": 0.1} for model in ("base", "lora")]
    write_html_report(report, predictions, folder)
    return folder


@pytest.fixture(scope="module")
def console(tiny_model_dir, tmp_path_factory):
    """(console URL, workspace, keys by role, the served run's feedback database)."""
    root = tmp_path_factory.mktemp("console")
    runs = [evaluated(make_run(root / folder, tiny_model_dir, seed), f1, day) for folder, seed, f1, day in (
        ("run", 1, 0.31, 20), ("improve/cycle-0001", 2, 0.45, 21), ("improve/cycle-0002", 3, 0.52, 22))]
    registry = Registry(f"sqlite:///{root / 'registry.db'}")
    registry.register_run(runs[0], "city", by="ana", reason="first version")
    registry.promote("city", 1, "production", by="ana", reason="launch")
    registry.register_run(runs[1], "city", "city@1", by="improve", reason="cycle 1")
    registry.register_run(runs[2], "city", "city@1", by="improve", reason="cycle 2")
    registry.start_canary("city", 3, 0.2, by="improve", reason="cycle 2 canary")
    keys = {name: create_key(root / "keys.json", name, [scope])
            for name, scope in (("lena", "approver"), ("sam", "viewer"), ("web", "chat"))}
    (root / "tailor.yaml").write_text(yaml.safe_dump({
        "base_model": tiny_model_dir, "train": {"dtype": "fp32"},
        "serve": {"api_key_file": "keys.json", "max_new_tokens": 6, "cache_size": 0, "rate_limit": "1000/minute",
                  "monitor_sample_seconds": 1, "aliases": {"city-bot": {"base": 1, "lora": 1}}}}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "tailor.cli.app", "serve", "-w", str(root), "--registry",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        wait_until_healthy(url, server, timeout=180)
        # residents using the chatbot: the canary splits `city`, the alias `city-bot`, one correction to review
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys['web']}"}, timeout=60) as http:
            for i in range(12):
                model = "city" if i % 2 else "city-bot"
                answer = http.post("/v1/chat/completions", json={
                    "model": model, "user": f"resident-{i}", "max_tokens": 4,
                    "messages": [{"role": "user", "content": QUESTION if i == 1 else f"Question {i}?"}]})
                assert answer.status_code == 200, answer.text
                feedback = {"response_id": answer.json()["id"], "rating": "down" if i % 3 == 1 else "up"}
                if i == 1:
                    feedback["correction"] = CORRECTION
                assert http.post("/v1/feedback", json=feedback).status_code == 200
        time.sleep(2)  # two readings for the graphs
        yield f"{url}/admin", root, keys, root / "run" / "feedback.db"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: `make setup` installs it (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})  # a fresh sessionStorage: signed out
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("TAILOR_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def sign_in(page, url: str, key: str) -> None:
    page.goto(url)
    page.wait_for_selector("#login", state="visible")
    page.fill("#api-key", key)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#tabs", state="visible")


def screen(page, name: str, ready: str) -> None:
    page.click(f"nav a[data-screen={name}]")
    page.wait_for_selector(f"#screen-{name} {ready}")


def shoot(page, path: Path) -> None:
    page.evaluate("window.scrollTo(0, 0)")  # the sticky header at the top of a full-page picture
    page.screenshot(path=str(path), full_page=True)


def test_an_approver_reviews_a_correction_and_promotes_a_version(page, console, shots):
    url, root, keys, feedback_db = console
    page.goto(url)
    page.wait_for_selector("#login", state="visible")
    assert page.locator("#tabs").is_hidden()  # nothing shown before a key
    shoot(page, shots / "00-sign-in.png")
    page.fill("#api-key", "tlr-not-a-key")
    page.press("#api-key", "Enter")
    page.wait_for_function("() => document.getElementById('banner').textContent.includes('refused')")
    sign_in(page, url, keys["lena"])
    assert page.locator("#who").inner_text() == "lena · approver"

    # (1) runs and their eval reports
    page.wait_for_selector("#screen-runs table")
    assert page.locator("#screen-runs tbody tr td:first-child").all_inner_texts() == [
        "improve/cycle-0002", "improve/cycle-0001", "run"]
    assert page.locator("#screen-runs tbody tr").nth(2).locator("td").last.inner_text() == "city@1"
    page.click("#screen-runs tr[data-run='run']")
    frame = page.frame_locator("iframe.report")
    assert "Evaluation of run" in frame.locator("h1").inner_text()
    assert frame.locator("img").count() >= 1  # the score bars of the real report page
    shoot(page, shots / "01-runs.png")

    # (2) registry: lineage, diff, then promote city@2 with a reason
    screen(page, "registry", "table")
    stages = dict(zip(page.locator("#screen-registry tr[data-label] td:first-child").all_inner_texts(),
                      page.locator("#screen-registry tr[data-label] td:nth-child(2)").all_inner_texts(), strict=True))
    assert stages == {"city@1": "production", "city@2": "candidate", "city@3": "staging"}
    page.click("#screen-registry tr[data-label='city@2']")
    page.wait_for_selector("#version-detail")
    assert "city@1" in page.locator("#version-detail dl").first.inner_text()  # its parent
    page.select_option("#screen-registry select[aria-label='diff from']", "city@1")
    page.select_option("#screen-registry select[aria-label='diff to']", "city@2")
    page.click("#screen-registry button:has-text('Compare')")
    page.wait_for_selector("text=metrics: city@1 → city@2")
    shoot(page, shots / "02-registry.png")
    page.select_option("#version-detail select[aria-label='target stage']", "production")
    page.fill("#version-detail input[aria-label='promotion reason']", "better on the corrected questions")
    page.click("#version-detail button:has-text('Promote')")
    page.wait_for_function("() => document.getElementById('banner').textContent.startsWith('Done')")
    page.wait_for_selector("#screen-registry tr[data-label='city@2'] .badge.production")
    registry = Registry(f"sqlite:///{root / 'registry.db'}")
    assert registry.resolve("city@production").label == "city@2"
    last = registry.history("city")[-1]
    assert (last.version.label, last.action, last.changed_by, last.reason) == (
        "city@2", "promote", "lena", "better on the corrected questions")
    newest = page.locator("#screen-registry .panel", has_text="Audit log").locator("tbody tr").first.inner_text()
    assert "city@2" in newest and "lena" in newest and "better on the corrected questions" in newest

    # (3) the review queue: edit the resident's correction, accept it with a reason
    screen(page, "review", ".filters")
    item = page.locator(".item", has_text=QUESTION)
    assert item.get_by_label("correction", exact=False).input_value() == CORRECTION
    shoot(page, shots / "03-review.png")
    item.locator("textarea").fill(CORRECTION + " It opens Monday to Saturday.")
    item.locator("input").fill("checked the opening hours page")
    item.get_by_role("button", name="Accept").click()
    page.wait_for_function("() => document.getElementById('banner').textContent.includes('accepted')")
    page.wait_for_selector(".filters button[data-status=accepted]:has-text('(1)')")
    assert page.locator(".item", has_text=QUESTION).count() == 0  # no longer pending
    store = FeedbackStore(feedback_db)
    (row,) = store.rows("f.correction IS NOT NULL")
    store.close()
    assert (row["review"], row["reviewed_correction"], row["reviewed_by"], row["review_note"]) == (
        "accepted", CORRECTION + " It opens Monday to Saturday.", "lena", "checked the opening hours page")

    # (4) A/B: the canary beside production, the alias with its versions
    screen(page, "ab", "h2")
    page.wait_for_selector("#screen-ab .canary")
    assert "city@3 on 20 % of users" in page.locator("#screen-ab .canary h3").inner_text()
    assert re.search(r"Difference in up-rate \(Fisher's exact test\): (not )?significant \(p [=<] [0-9.]+\)",
                     page.locator("#screen-ab .canary").inner_text())
    alias_rows = page.locator("#screen-ab .alias", has_text="city-bot").locator("tbody tr").all_inner_texts()
    assert sorted(row.split()[0] for row in alias_rows) == ["base", "lora"]
    shoot(page, shots / "04-ab.png")

    # (5) monitoring: a graph per signal, drawn from the server's own metrics
    screen(page, "monitor", ".charts .chart svg")
    assert page.locator(".chart").count() == 12
    answers = page.locator(".chart[data-signal=answers_per_minute]")
    assert answers.locator(".title b").inner_text() != "—"
    assert answers.locator("polyline, circle").count() >= 1
    assert page.locator(".chart[data-signal=thumbs_down_rate] .title b").inner_text().endswith("%")
    shoot(page, shots / "05-monitor.png")


def test_a_viewer_sees_every_screen_without_the_actions(page, console):
    url, _, keys, _ = console
    sign_in(page, url, keys["sam"])
    assert page.locator("#who").inner_text() == "sam · viewer"
    screen(page, "registry", "table")
    page.click("#screen-registry tr[data-label='city@1']")
    page.wait_for_selector("#version-detail")
    assert page.locator("#version-detail button:has-text('Promote')").is_disabled()
    assert "These actions need the approver role" in page.locator("#version-detail").inner_text()
    page.click("#screen-registry tr[data-label='city@2'] a")  # its run folder: the runs screen opens its report
    page.wait_for_selector("#screen-runs tr.selected[data-run='improve/cycle-0001']")
    assert "Evaluation of cycle-0001" in page.frame_locator("iframe.report").locator("h1").inner_text()
    screen(page, "review", ".filters")
    page.click(".filters button[data-status=all]")
    page.wait_for_selector(".item")
    assert page.get_by_role("button", name="Accept", exact=True).count() == 0
    assert "These actions need the reviewer role" in page.locator("#screen-review").inner_text()
