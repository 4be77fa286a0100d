"""A small polite web crawler for `tailor ingest --crawl URL…`: seed pages or a sitemap, same site only, robots.txt
honoured, rate-limited, bounded by page count and link depth, resumable.

Pages are saved as HTML files in a folder, with `.crawl.json` (the state: queue, pages seen, URL of each saved file)
beside them; ingest reads that folder with the HTML reader and names each record by its URL. The state is written
after every page, so an interrupted crawl continues where it stopped when run again with the same folder.

Written on the standard library (urllib.request, urllib.robotparser, html.parser) rather than a crawling framework:
the job is a bounded breadth-first walk of one site, and Scrapy's engine (Twisted, its own settings and item
pipeline) would be most of the code a reader has to understand.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
import urllib.robotparser
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlsplit

from tailor.errors import TailorError
from tailor.workspace import write_json

STATE_FILE = ".crawl.json"  # hidden: ingest reads the folder and must not take it for a document
USER_AGENT = "tailor-crawler/0.1 (+https://pypi.org/project/tailor)"
MAX_PAGE_BYTES = 10 * 1024 * 1024  # a "page" larger than this is a download, not a document


@dataclass
class CrawlSummary:
    pages: dict[str, str] = field(default_factory=dict)  # URL -> saved file name
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (URL, reason)
    remaining: int = 0  # URLs still queued when a bound stopped the crawl

    def to_dict(self) -> dict:
        return {"pages": len(self.pages), "remaining": self.remaining,
                "skipped": [{"url": url, "reason": reason} for url, reason in self.skipped]}


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.links.append(href)


def page_links(page: str, base: str) -> list[str]:
    """Absolute http(s) links of a page, fragments removed, in page order without repeats."""
    parser = _Links()
    parser.feed(page)
    found = []
    for href in parser.links:
        url = urldefrag(urljoin(base, href.strip())).url
        if urlsplit(url).scheme in ("http", "https") and url not in found:
            found.append(url)
    return found


def sitemap_urls(document: bytes) -> list[str]:
    """The <loc> entries of a sitemap (or sitemap index) XML document."""
    try:
        root = ElementTree.fromstring(document)
    except ElementTree.ParseError as exc:
        raise TailorError(f"sitemap: not valid XML ({exc})") from None
    return [element.text.strip() for element in root.iter() if element.tag.rsplit("}", 1)[-1] == "loc"
            and element.text and element.text.strip()]


def _site(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def crawl(seeds: list[str], folder: Path | str, *, max_pages: int = 50, max_depth: int = 2, delay: float = 1.0,
          timeout: float = 15.0, on_page: Callable[[str], None] | None = None,
          fetch: Callable[[str], tuple[str, bytes]] | None = None) -> CrawlSummary:
    """Breadth-first from `seeds` (pages, or sitemap .xml URLs whose entries become depth-0 pages), staying on the
    seeds' sites. `delay`: seconds between requests to one site (robots.txt Crawl-delay wins when larger)."""
    for seed in seeds:
        if urlsplit(seed).scheme not in ("http", "https") or not urlsplit(seed).netloc:
            raise TailorError(f"--crawl: {seed!r} is not an http(s) URL")
    if max_pages <= 0 or max_depth < 0:
        raise TailorError("--crawl: the page limit must be positive and the depth at least 0")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fetch = fetch or (lambda url: _fetch(url, timeout))
    state_path = folder / STATE_FILE
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else \
        {"queue": [], "seen": [], "pages": {}, "skipped": []}
    sites = {_site(seed) for seed in seeds}
    seen = set(state["seen"])
    if not state["queue"] and not state["pages"]:
        for seed in seeds:
            if urlsplit(seed).path.endswith(".xml"):
                try:
                    _, body = fetch(seed)
                    entries = sitemap_urls(body)
                except (OSError, TailorError) as exc:
                    raise TailorError(f"--crawl: cannot read the sitemap {seed} ({exc})") from None
                state["queue"] += [[url, 0] for url in entries if _site(url) in sites]
            else:
                state["queue"].append([seed, 0])
        seen.update(url for url, _ in state["queue"])
    robots: dict[str, urllib.robotparser.RobotFileParser] = {}
    last_request: dict[str, float] = {}
    while state["queue"] and len(state["pages"]) < max_pages:
        url, depth = state["queue"].pop(0)
        site = _site(url)
        rules = robots.get(site)
        if rules is None:
            rules = robots[site] = _robots(site, fetch)
        if not rules.can_fetch(USER_AGENT, url):
            state["skipped"].append([url, "disallowed by robots.txt"])
            continue
        wait = max(delay, float(rules.crawl_delay(USER_AGENT) or 0)) - (time.monotonic() - last_request.get(site, -1e9))
        if wait > 0:
            time.sleep(wait)
        last_request[site] = time.monotonic()
        try:
            content_type, body = fetch(url)
        except (OSError, ValueError) as exc:
            state["skipped"].append([url, f"fetch failed ({exc})"])
            _save(state_path, state, seen)
            continue
        if "html" not in content_type:
            state["skipped"].append([url, f"not an HTML page ({content_type or 'no content type'})"])
            _save(state_path, state, seen)
            continue
        name = hashlib.sha256(url.encode()).hexdigest()[:16] + ".html"
        (folder / name).write_bytes(body)
        state["pages"][url] = name
        if depth < max_depth:
            for link in page_links(body.decode("utf-8", errors="replace"), url):
                if _site(link) in sites and link not in seen:
                    seen.add(link)
                    state["queue"].append([link, depth + 1])
        _save(state_path, state, seen)
        if on_page is not None:
            on_page(url)
    _save(state_path, state, seen)
    return CrawlSummary(pages=dict(state["pages"]), skipped=[tuple(item) for item in state["skipped"]],
                        remaining=len(state["queue"]))


def _save(path: Path, state: dict, seen: set[str]) -> None:
    state["seen"] = sorted(seen)
    write_json(path, state)


def _robots(site: str, fetch) -> urllib.robotparser.RobotFileParser:
    """The site's robots.txt rules; a missing file (404) allows everything, as the standard says."""
    rules = urllib.robotparser.RobotFileParser(site + "/robots.txt")
    try:
        _, body = fetch(site + "/robots.txt")
        rules.parse(body.decode("utf-8", errors="replace").splitlines())
    except urllib.error.HTTPError as exc:
        rules.parse([] if exc.code >= 400 and exc.code < 500 else ["User-agent: *", "Disallow: /"])
    except OSError:
        rules.parse([])
    return rules


def _fetch(url: str, timeout: float) -> tuple[str, bytes]:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) only, checked above
        body = response.read(MAX_PAGE_BYTES + 1)
        if len(body) > MAX_PAGE_BYTES:
            raise ValueError(f"larger than {MAX_PAGE_BYTES // 1024 // 1024} MB")
        return response.headers.get("Content-Type", ""), body
