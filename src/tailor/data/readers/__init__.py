"""Readers turn one file into text `Document`s: one module per source kind, found by extension in `registry`."""

from tailor.data.readers.registry import (
    Document,
    Reader,
    ReaderOptions,
    ReaderWarning,
    extension_of,
    read_document,
    reader_for,
    register_reader,
    supported_extensions,
)

__all__ = ["Document", "Reader", "ReaderOptions", "ReaderWarning", "extension_of", "read_document", "reader_for",
           "register_reader", "supported_extensions"]
