"""The chat page in headless Chromium (Playwright, Debian's /usr/bin/chromium): it lists the models, streams an
answer, switches models, and a thumbs-down with a correction lands in the feedback database."""

from __future__ import annotations

import os
import shutil
import sqlite3

import pytest
import torch

from tailor.config import ServeConfig
from tailor.serve.engine import Engine
from tests.unit.helpers import start_server
from tests.unit.serve.test_serve import adapter_dir  # noqa: F401 (a fixture)

pytestmark = pytest.mark.browser
CHROMIUM = os.environ.get("TAILOR_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_dir):  # noqa: F811 - adapter_dir is the imported fixture
    torch.set_num_threads(1)  # tiny matmuls: more threads only synchronize
    # answers long enough to outrun the output filter's held-back tail, so the page sees many deltas
    engine = Engine(tiny_model_dir, adapters={"city.v1": adapter_dir}, dtype=torch.float32, max_new_tokens=60)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    server, url = start_server(engine, config=ServeConfig(), root=root)
    yield url, root
    server.should_exit = True


@pytest.fixture(scope="module")
def page(served):
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: `make setup` installs it (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page()
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def ask(page, text: str) -> str:
    """Send a message; return the final answer, after checking it arrived in several streamed pieces."""
    before = page.locator(".msg.assistant").count()
    page.evaluate("""() => {
        window.updates = 0;
        new MutationObserver(() => window.updates++).observe(document.getElementById("log"),
                                                             {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#input", text)
    page.press("#input", "Enter")
    answer = page.locator(".msg.assistant").nth(before)
    page.wait_for_function(f"() => document.querySelectorAll('.msg.assistant.pending').length === 0 && "
                           f"document.querySelectorAll('.msg.assistant').length > {before}")
    assert page.evaluate("window.updates") > 3  # text arrived piece by piece, not all at once
    return answer.inner_text()


def test_chat_streams_switches_models_and_sends_feedback(page, served):
    url, root = served
    page.goto(url)
    page.wait_for_function("() => document.querySelectorAll('#model option').length >= 2")
    assert page.locator("#model option").all_inner_texts() == ["base", "city.v1"]
    assert page.locator("#api-key").is_hidden()  # this server needs no key

    first = ask(page, "When is the library open?")
    assert first.strip()
    page.select_option("#model", "city.v1")
    second = ask(page, "And on Sundays?")
    assert second.strip()

    turn = page.locator(".turn").last
    for name in ("thumbs up", "thumbs down"):  # drawn icons, visible without an emoji font
        box = turn.get_by_role("button", name=name).locator("svg").bounding_box()
        assert box is not None and box["width"] >= 12 and box["height"] >= 12
    turn.get_by_role("button", name="thumbs down").click()
    turn.get_by_label("correction").fill("The library is closed on Sundays.")
    turn.get_by_role("button", name="Send feedback").click()
    page.wait_for_function("() => document.querySelector('.turn:last-of-type .feedback span')"
                           "?.textContent.startsWith('Thanks')")
    assert turn.get_by_label("correction").is_hidden()  # the box closes once the feedback is stored
    with sqlite3.connect(root / "feedback.db") as db:
        rows = db.execute("SELECT model, rating, correction, answer FROM feedback").fetchall()
    assert len(rows) == 1
    model, rating, correction, answer = rows[0]
    assert (model, rating, correction) == ("city.v1", "down", "The library is closed on Sundays.")
    assert answer.strip() == second.strip()


def test_sources_in_an_answer_are_listed(page, served):
    page.goto(served[0])
    listed = page.evaluate("""() => {
        const turn = document.createElement("div");
        showSources(turn, "City Hall opens at 8.\\nSources: city-hall.md, hours.pdf");
        return [...turn.querySelectorAll(".sources li")].map((item) => item.textContent);
    }""")
    assert listed == ["city-hall.md", "hours.pdf"]


def test_a_server_with_keys_asks_for_one(page, engine, tmp_path):
    from tailor.serve.security import create_key

    key = create_key(tmp_path / "keys.json", "page", ["chat"])
    server, url = start_server(engine, config=ServeConfig(api_key_file="keys.json"), root=tmp_path)
    try:
        page.goto(url)
        page.wait_for_selector("#api-key", state="visible")
        assert page.locator("#model option").count() == 0  # nothing listed without a key
        page.fill("#api-key", key)
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("() => document.querySelectorAll('#model option').length === 2")
        assert ask(page, "Is the pool open?").strip()
    finally:
        server.should_exit = True


def test_a_grounded_answer_shows_its_sources_as_expandable_links(page, tiny_model_dir, tmp_path):
    from tailor.train.run import run_training
    from tests.unit.methods.test_rag import make_workspace, prepare_run

    workspace = make_workspace(tmp_path / "ws", tiny_model_dir)
    config, root, run_dir = prepare_run(workspace)
    run_training(config, root, run_dir, show_progress=False)
    engine = Engine(tiny_model_dir, adapters={"rag": str(run_dir / "rag")}, dtype=torch.float32, max_new_tokens=40)
    server, url = start_server(engine, config=ServeConfig(), root=tmp_path)
    try:
        page.goto(url)
        page.wait_for_function("() => document.querySelectorAll('#model option').length === 2")
        assert page.locator("#model").input_value() == "rag"  # opens on the workspace's customized model
        ask(page, "What is the address of City Hall?")
        sources = page.locator(".turn").last.locator(".sources details")
        sources.first.wait_for()
        link = sources.first.locator("summary a")
        assert "city-hall.md" in link.inner_text()
        assert sources.first.locator("blockquote").is_hidden()  # the snippet is folded until asked for
        sources.first.locator("summary").click(position={"x": 2, "y": 2})  # the marker, not the link
        assert sources.first.locator("blockquote").is_visible()
        link.click()  # the whole passage, fetched from /v1/sources/{id}
        page.wait_for_function("() => document.querySelector('.turn:last-of-type .sources blockquote')"
                               "?.textContent.includes('400 Linden Avenue')")
        page.screenshot(path=str(tmp_path / "grounded-answer.png"), full_page=True)
    finally:
        server.should_exit = True
        engine.shutdown()
