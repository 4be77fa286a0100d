"""Word documents (.docx): paragraphs and tables in reading order, headings and list items kept as such.

python-docx parses the Office Open XML package; we walk the body in document order (`iter_inner_content`) so a table
stays between the paragraphs it sat between. Tables become one 'Header: value; ...' line per row, as in the HTML and
Markdown readers.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

from tailor.data.readers.markdown import table_to_text
from tailor.data.readers.registry import Document, register_reader
from tailor.errors import TailorError


def docx_to_text(document) -> tuple[str, str | None]:
    """(text, title) of a python-docx Document: blocks separated by blank lines."""
    from docx.table import Table

    blocks: list[str] = []
    first_heading = None
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            rows = [[cell.text.strip() for cell in row.cells] for row in block.rows]
            # merged cells repeat their text in every grid cell they span
            rows = [[value for index, value in enumerate(row) if index == 0 or value != row[index - 1]] for row in rows]
            if rows:
                blocks.append(table_to_text(rows[0], rows[1:]) if len(rows) > 1 else table_to_text(None, rows))
            continue
        text = block.text.strip()
        if not text:
            continue
        style = (block.style.name if block.style is not None else "") or ""
        if style.startswith(("Heading", "Title")) and first_heading is None:
            first_heading = text
        if style.startswith("List") and blocks and blocks[-1].startswith("- "):
            blocks[-1] += "\n- " + text  # consecutive items form one list block
        else:
            blocks.append("- " + text if style.startswith("List") else text)
    title = (document.core_properties.title or "").strip() or first_heading
    return "\n\n".join(blocks), title


def read_docx(path: Path) -> Iterator[Document]:
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:
        document = docx.Document(str(path))
    except (PackageNotFoundError, zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise TailorError(f"{path}: damaged or not a Word .docx file ({type(exc).__name__}: {exc}); an old .doc "
                          f"file must be saved as .docx first") from None
    except OSError as exc:
        raise TailorError(f"{path}: cannot read ({exc.strerror or exc})") from None
    text, title = docx_to_text(document)
    yield Document(text=text, source=str(path), title=title)


register_reader([".docx"], read_docx)
