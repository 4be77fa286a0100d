"""HTML pages (.html, .htm): the main content only, without navigation, banners, footers, sidebars or scripts.

trafilatura finds the main content and returns it as a small XML tree (p, head, list/item, table/row/cell, code,
quote, lb), which we turn into text with a blank line between blocks. We walk that tree rather than ask trafilatura
for Markdown or plain text: its Markdown leaves code fences unbalanced on real pages (Node.js's API docs lose half
the page into one code block) and its plain text puts every block on one line, losing paragraph breaks. When
trafilatura finds nothing (a tiny page, an odd layout) a small stdlib parser takes the text outside the tags that
never hold content.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import trafilatura
from lxml import etree

from tailor.data.readers.markdown import table_to_text
from tailor.data.readers.registry import Document, register_reader
from tailor.data.readers.text import decode_text, read_bytes

# Never content. A <header>/<footer> inside <article> or <main> holds the article's own title or notes, so only the
# page-level ones go.
DROPPED_TAGS = frozenset({"nav", "header", "footer", "aside", "script", "style", "noscript", "template", "svg",
                          "head", "form", "button", "iframe", "object", "select"})
_DROPPED_ROLES = frozenset({"navigation", "banner", "contentinfo", "complementary", "search"})
_PRUNE_XPATH = ["//nav", "//aside", "//header[not(ancestor::article or ancestor::main)]",
                "//footer[not(ancestor::article or ancestor::main)]",
                # permalink anchors after headings: Sphinx's pilcrow, Node.js's '#'
                "//a[contains(@class, 'headerlink') or normalize-space(.)='¶' or normalize-space(.)='#']",
                *(f"//*[@role='{role}']" for role in sorted(_DROPPED_ROLES))]
_TITLE = re.compile(r"<title[^>]*>(.*?)</title\s*>", re.IGNORECASE | re.DOTALL)
# <meta charset="x">, <meta http-equiv="Content-Type" content="text/html; charset=x"> or <?xml encoding="x"?>
_DECLARED_CHARSET = re.compile(rb"<meta[^>]*charset\s*=\s*[\"']?([\w.:-]+)|<\?xml[^>]*encoding\s*=\s*[\"']([\w.:-]+)",
                               re.IGNORECASE)

# Main-content extraction needs the whole page as a tree (several times its size in memory): larger files are
# refused rather than risk the machine's memory; real pages are far smaller.
MAX_PAGE_BYTES = 64 * 2**20

# trafilatura logs every page it finds no content in; the fallback below handles those pages
logging.getLogger("trafilatura").setLevel(logging.CRITICAL)


def html_to_text(page: str) -> tuple[str, str | None]:
    """Return (main text, title) of an HTML page; blocks are separated by blank lines."""
    found = _TITLE.search(page)
    title = (re.sub(r"\s+", " ", html.unescape(found.group(1))).strip() or None) if found else None
    extracted = trafilatura.bare_extraction(page, include_comments=False, include_tables=True, favor_recall=True,
                                            prune_xpath=_PRUNE_XPATH)
    body = getattr(extracted, "body", None)
    text = "\n\n".join(_blocks(body)).strip() if body is not None else ""
    if not text:
        parser = _ContentText()
        parser.feed(page)
        parser.close()
        text = parser.text()
    return text, title


# --- trafilatura's XML tree -> text ---------------------------------------------------------------------------

_BLOCK_ELEMENTS = frozenset({"p", "head", "list", "table", "quote", "div", "code"})


def _blocks(container: etree._Element) -> list[str]:
    """The blocks of a container (body, div, quote, list item): block children apart, loose text between them."""
    blocks, loose = [], [_squash(container.text)]
    for child in container:
        # code is a block when it spans lines; a one-line <code> inside a sentence is part of the sentence
        is_block = child.tag in _BLOCK_ELEMENTS and (child.tag != "code" or "\n" in "".join(child.itertext()))
        if is_block:
            blocks.append("".join(loose).strip())
            blocks.append(_block(child))
            loose = []
        else:
            loose.append(_inline(child))
        loose.append(_squash(child.tail))
    blocks.append("".join(loose).strip())
    return [block for block in blocks if block]


def _block(element: etree._Element) -> str:
    if element.tag == "code" or (element.tag == "quote" and not any(c.tag in _BLOCK_ELEMENTS for c in element)):
        return _inline(element, keep_space=True).strip("\n")  # code and <pre> keep their line breaks and indents
    if element.tag == "list":
        lines = []
        for number, item in enumerate(element.iterfind("item"), start=1):
            marker = f"{number}. " if element.get("rend") == "ol" else "" if (item.get("rend") or "")[:2] == "dt" \
                else "- "
            body = "\n".join(_blocks(item))
            lines.append(marker + body.replace("\n", "\n  ") if body else "")
        return "\n".join(line for line in lines if line)
    if element.tag == "table":
        rows = [(row, [_inline(cell).strip() for cell in row.iterfind("cell")]) for row in element.iterfind("row")]
        has_header = bool(rows) and all(cell.get("role") == "head" for cell in rows[0][0].iterfind("cell"))
        cells = [values for _, values in rows]
        return table_to_text(cells[0] if has_header else None, cells[1:] if has_header else cells)
    if element.tag in ("div", "quote"):
        return "\n\n".join(_blocks(element))
    return _inline(element).strip()  # p, head


def _inline(element: etree._Element, keep_space: bool = False) -> str:
    squash = (lambda text: text or "") if keep_space else _squash
    parts = [squash(element.text)]
    for child in element:
        if child.tag == "lb":
            parts.append("\n")
        elif child.tag in ("list", "table"):  # a block nested in a paragraph or cell
            parts.append("\n" + _block(child) + "\n")
        else:
            parts.append(_inline(child, keep_space))
        parts.append(squash(child.tail))
    return "".join(parts)


def _squash(text: str | None) -> str:
    return re.sub(r"\s+", " ", text) if text else ""


# --- fallback: the stdlib parser ----------------------------------------------------------------------------------

_BLOCK_TAGS = frozenset({"p", "div", "section", "article", "main", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul",
                         "ol", "dl", "dt", "dd", "table", "tr", "blockquote", "pre", "figure", "figcaption",
                         "hr", "br", "address", "details", "summary", "caption"})
_VOID_TAGS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
                        "track", "wbr"})


class _ContentText(HTMLParser):
    """Text outside DROPPED_TAGS, with a paragraph break at block tags and whitespace kept inside <pre>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping: str | None = None  # tag whose subtree is being dropped
        self._skip_depth = 0  # nested open tags of that name, so <div role=navigation><div>…</div></div> ends right
        self._pre_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skipping is not None:
            if tag == self._skipping and tag not in _VOID_TAGS:
                self._skip_depth += 1
            return
        if tag in DROPPED_TAGS or dict(attrs).get("role") in _DROPPED_ROLES:
            if tag not in _VOID_TAGS:
                self._skipping, self._skip_depth = tag, 1
            return
        if tag == "pre":
            self._pre_depth += 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n\n" if tag != "br" else "\n")

    def handle_endtag(self, tag: str) -> None:
        if self._skipping is not None:
            if tag == self._skipping:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skipping = None
            return
        if tag == "pre" and self._pre_depth:
            self._pre_depth -= 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self._skipping is None:
            self.parts.append(data if self._pre_depth else _squash(data))

    def text(self) -> str:
        joined = "".join(self.parts)
        joined = re.sub(r"[ \t]*\n[ \t]*(?=\n)", "\n", joined)  # lines holding only spaces between blocks
        return re.sub(r"\n{3,}", "\n\n", joined).strip()


def read_html(path: Path) -> Iterator[Document]:
    data = read_bytes(path, MAX_PAGE_BYTES)
    declared = _DECLARED_CHARSET.search(data[:4096])
    charset = (declared.group(1) or declared.group(2)).decode("ascii") if declared else None
    text, title = html_to_text(decode_text(data, path, declared=charset))
    yield Document(text=text, source=str(path), title=title)


register_reader([".html", ".htm", ".html.gz", ".htm.gz"], read_html)
