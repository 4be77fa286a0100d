"""The crawler against a real local web server: same site only, robots.txt, depth and page bounds, sitemaps,
resuming, and ingest naming each record by its URL."""

from __future__ import annotations

import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tailor.data.crawl import STATE_FILE, crawl, page_links
from tailor.data.ingest import ingest
from tailor.errors import TailorError


def page(title: str, body: str, links: list[str]) -> str:
    anchors = "".join(f'<li><a href="{link}">{link}</a></li>' for link in links)
    return (f"<html><head><title>{title}</title></head><body><nav><ul>{anchors}</ul></nav><main><h1>{title}</h1>"
            f"<p>{body}</p></main></body></html>")


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "site"
    (root / "private").mkdir(parents=True)
    (root / "deep").mkdir()
    pages = {
        "index.html": page("Home", "Welcome to the city of Maplewood services portal for residents.",
                           ["/pool.html", "library.html#hours", "http://example.invalid/elsewhere.html",
                            "/private/secret.html", "mailto:clerk@maplewood.gov", "/notes.txt"]),
        "pool.html": page("Pool", "The municipal pool opens on June first and closes on Labor Day.",
                          ["/deep/level2.html", "/index.html"]),
        "library.html": page("Library", "The central library is open Monday to Saturday from nine to eight.", []),
        "deep/level2.html": page("Level two", "Lap swimming runs on weekday mornings from six to eight.",
                                 ["/deep/level3.html"]),
        "deep/level3.html": page("Level three", "This page is three links away from the home page.", []),
        "private/secret.html": page("Secret", "Robots must not read this page.", []),
    }
    for name, text in pages.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "notes.txt").write_text("plain text, not a page", encoding="utf-8")
    (root / "robots.txt").write_text("User-agent: *\nDisallow: /private/\n", encoding="utf-8")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def test_crawl_stays_on_site_honours_robots_and_depth(site, tmp_path):
    base, _ = site
    summary = crawl([base + "/index.html"], tmp_path / "out", max_pages=20, max_depth=2, delay=0)
    assert set(summary.pages) == {f"{base}/index.html", f"{base}/pool.html", f"{base}/library.html",
                                  f"{base}/deep/level2.html"}  # level3 is depth 3; the other site is never asked
    skipped = dict(summary.skipped)
    assert skipped[f"{base}/private/secret.html"] == "disallowed by robots.txt"
    assert skipped[f"{base}/notes.txt"].startswith("not an HTML page (text/plain")
    state = json.loads((tmp_path / "out" / STATE_FILE).read_text())
    assert state["pages"] == summary.pages and summary.remaining == 0


def test_crawl_is_bounded_and_resumes_where_it_stopped(site, tmp_path):
    base, _ = site
    first = crawl([base + "/index.html"], tmp_path / "out", max_pages=2, max_depth=5, delay=0)
    assert len(first.pages) == 2 and first.remaining > 0
    second = crawl([base + "/index.html"], tmp_path / "out", max_pages=10, max_depth=5, delay=0)
    assert set(first.pages) < set(second.pages) and len(second.pages) == 5 and second.remaining == 0


def test_sitemap_seeds_rate_limit_and_bad_urls(site, tmp_path):
    base, root = site
    (root / "sitemap.xml").write_text(
        '<?xml version="1.0"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
        f"<url><loc>{base}/library.html</loc></url><url><loc>{base}/pool.html</loc></url>"
        "<url><loc>http://example.invalid/x.html</loc></url></urlset>", encoding="utf-8")
    import time

    started = time.monotonic()
    summary = crawl([base + "/sitemap.xml"], tmp_path / "out", max_pages=10, max_depth=0, delay=0.3)
    assert set(summary.pages) == {f"{base}/library.html", f"{base}/pool.html"}
    assert time.monotonic() - started >= 0.3  # two requests to one site, 0.3 s apart
    with pytest.raises(TailorError, match=r"--crawl: 'ftp://x' is not an http\(s\) URL"):
        crawl(["ftp://x"], tmp_path / "o2")
    assert page_links('<a href="a.html#x">a</a><a href="a.html">again</a>', "http://h/d/") == ["http://h/d/a.html"]


def test_ingest_names_crawled_records_by_url(site, tmp_path, monkeypatch):
    base, _ = site
    monkeypatch.chdir(tmp_path)
    summary = crawl([base + "/index.html"], Path("crawl"), max_pages=3, max_depth=1, delay=0)
    names = {str(Path("crawl") / name): url for url, name in summary.pages.items()}
    ingest(["crawl"], "corpus.jsonl", progress=False, source_names=names, min_chars=10)
    records = [json.loads(line) for line in Path("corpus.jsonl").read_text().splitlines()]
    assert {r["source"] for r in records} == set(summary.pages)
    pool = next(r for r in records if r["source"].endswith("/pool.html"))
    assert "opens on June first" in pool["text"] and pool["title"] == "Pool"
