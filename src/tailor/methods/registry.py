"""One registry of customization methods. A method module calls `register(Method(...))` once at import.

The registry rejects unknown and duplicate names, so `tailor train --method`, the search and the evaluation all see
the same set, and adding a method touches one module and its test.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from tailor.errors import TailorError

# Modules imported on first use, in cheapest-to-costliest order (the order `tailor methods` lists them in).
METHOD_MODULES = ("lora",)


class MethodOptions(BaseModel):
    """Base of every method's options: typed, defaulted, documented, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Method:
    name: str
    options: type[MethodOptions]
    summary: str
    # prepare(model, options) -> model whose trainable parameters are the ones this method trains
    prepare: Callable[[Any, Any], Any] | None = None
    trains: bool = True
    artifact: str = "adapter"  # what `save` writes: a PEFT adapter folder, a prompt profile, full weights


_METHODS: dict[str, Method] = {}
_loaded = False


def register(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method '{method.name}' is already registered")
    _METHODS[method.name] = method
    return method


def _load_all() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in METHOD_MODULES:
            importlib.import_module(f"tailor.methods.{module}")


def names() -> list[str]:
    _load_all()
    return list(_METHODS)


def get(name: str, key: str = "method") -> Method:
    _load_all()
    if name not in _METHODS:
        raise TailorError(f"{key}: unknown method '{name}' (available: {', '.join(_METHODS)})")
    return _METHODS[name]
