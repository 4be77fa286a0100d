"""Markdown files (.md, .markdown) turned into readable plain text.

We parse with markdown-it-py (already installed: `rich` depends on it) rather than strip syntax with regular
expressions, because only a real parser knows that `*` in `2*3` is text, that a fenced block's content is code to
keep, and where a table cell ends. The HTML reader shares `table_to_text`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from markdown_it import MarkdownIt
from markdown_it.tree import SyntaxTreeNode

from tailor.data.readers.registry import Document, ReaderOptions, register_reader
from tailor.data.readers.text import read_parts

_PARSER = MarkdownIt("commonmark").enable(["table", "strikethrough"])
# YAML front matter (Jekyll, Hugo, MkDocs): metadata, not prose
_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?\n)(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.DOTALL)
_FRONT_MATTER_TITLE = re.compile(r"^title:[ \t]*(.+?)[ \t]*$", re.MULTILINE)
_TAG = re.compile(r"<[^>]*>")
_BREAK_TAG = re.compile(r"<br\s*/?>", re.IGNORECASE)


def markdown_to_text(source: str) -> tuple[str, str | None]:
    """Return (plain text, title): paragraphs separated by blank lines, markup removed, link and code text kept."""
    title = None
    front = _FRONT_MATTER.match(source)
    if front:
        source = source[front.end():]
        found = _FRONT_MATTER_TITLE.search(front.group(1))
        if found:
            title = found.group(1).strip("\"'") or None
    root = SyntaxTreeNode(_PARSER.parse(source))
    if title is None:
        headings = [node for node in root.children if node.type == "heading"]
        first_h1 = next((node for node in headings if node.tag == "h1"), headings[0] if headings else None)
        if first_h1 is not None:
            title = _inline_text(first_h1.children[0]).strip() or None
    return _block_text(root).strip(), title


def _block_text(node: SyntaxTreeNode) -> str:
    kind = node.type
    if kind in ("paragraph", "heading"):
        return _inline_text(node.children[0]).strip() if node.children else ""
    if kind in ("fence", "code_block"):
        return node.content.rstrip("\n")
    if kind == "html_block":
        return _TAG.sub("", node.content).strip()
    if kind == "hr":
        return ""
    if kind in ("bullet_list", "ordered_list"):
        start = int(node.attrs.get("start", 1)) if kind == "ordered_list" else 1
        items = []
        for number, item in enumerate(node.children, start=start):
            marker = f"{number}. " if kind == "ordered_list" else "- "
            body = "\n".join(filter(None, (_block_text(child) for child in item.children)))
            # nested content is indented under its marker, so a sub-list still reads as one
            items.append(marker + body.replace("\n", "\n  "))
        return "\n".join(items)
    if kind == "table":
        return _table_text(node)
    # root, blockquote, list items: their children are blocks separated by blank lines
    return "\n\n".join(filter(None, (_block_text(child) for child in node.children)))


def _table_text(table: SyntaxTreeNode) -> str:
    rows = [[_inline_text(cell.children[0]).strip() if cell.children else "" for cell in row.children]
            for section in table.children for row in section.children]
    has_header = bool(rows) and table.children[0].type == "thead"
    return table_to_text(rows[0] if has_header else None, rows[1:] if has_header else rows)


def table_to_text(header: list[str] | None, rows: list[list[str]]) -> str:
    """One line per row, 'Header: value; Header: value', which reads as a sentence where pipes would not."""
    if not header or not any(header):
        return "\n".join(line for line in ("; ".join(filter(None, row)) for row in rows) if line)
    if not rows:
        return " | ".join(header)
    lines = ("; ".join(f"{name}: {value}" if name else value for name, value in zip(header, row, strict=False) if value)
             for row in rows)
    return "\n".join(line for line in lines if line)


def _inline_text(node: SyntaxTreeNode) -> str:
    kind = node.type
    if kind in ("text", "code_inline"):
        return node.content
    if kind == "softbreak":
        return " "  # hard-wrapped source lines belong to one paragraph
    if kind == "hardbreak":
        return "\n"
    if kind == "html_inline":
        # markup such as <kbd> or <span>: the text around it stays; a line break stays a break
        return "\n" if _BREAK_TAG.match(node.content) else ""
    # inline, link, image (children are the alt text), em, strong, s
    return "".join(_inline_text(child) for child in node.children)


def read_markdown(path: Path, options: ReaderOptions) -> Iterator[Document]:
    # A file over max_record_chars is parsed a record at a time (cut at blank lines), so it is never in memory
    # whole; a code block with blank lines that straddles a cut then reads as paragraphs, a fair price for files
    # that size.
    yield from read_parts(path, options, convert=markdown_to_text)


register_reader([".md", ".markdown", ".md.gz"], read_markdown)
