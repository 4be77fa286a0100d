"""MkDocs hook: the reference pages generated from the code at every build, so they cannot drift from it.

- reference/configuration.md from the pydantic schema (`tailor.config.TailorConfig`): every key, type, default, help;
- reference/methods.md from the method registry: every method's summary and options;
- reference/cli.md from the Typer app: every command, argument and option;
- reference/http.md from the server's OpenAPI schema: every route and the fields of its request body.

`mkdocs build --strict` fails when a generated page links to a page that does not exist;
tests/unit/project/test_docs.py fails when a key, command or option lacks a description.
"""

from __future__ import annotations

import json
import re
import types
from typing import Any, Literal, Union, get_args, get_origin

from mkdocs.structure.files import File
from pydantic import BaseModel
from pydantic_core import PydanticUndefined


# --- Markdown helpers ---------------------------------------------------------------------------------------------

def text(value: str) -> str:
    """Help text as a Markdown table cell: HTML-like words (`<EMAIL>`) and pipes escaped outside code spans."""
    parts = (value or "").replace("\n", " ").split("`")
    for i in range(0, len(parts), 2):  # even parts are outside backticks
        parts[i] = parts[i].replace("\\", "\\\\").replace("<", "&lt;").replace("*", r"\*")
    return "`".join(parts).replace("|", r"\|")


def code(value: str) -> str:
    """A value in a code span; a value holding a backtick is written plain."""
    return f"`{value}`".replace("|", r"\|") if "`" not in value else text(value)


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


# --- pydantic models: configuration and method options ------------------------------------------------------------

def type_name(annotation: Any) -> str:
    """`Literal["a", "b"] | None` -> "a, b or null", in the words of the YAML a user writes."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"map of {type_name(args[0])} to {type_name(args[1])}" if args else "map"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.__name__
    return getattr(annotation, "__name__", str(annotation))


def default_of(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return code(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))


def nested_models(annotation: Any) -> list[type[BaseModel]]:
    """Models inside a field's type: a section (`ingest`), or items of a list or map (`eval.rules`, `tune.space`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in nested_models(arg)]


def is_section(field) -> bool:
    """A field that is a model of its own (`ingest`, `eval.judge`), as opposed to a list or map of models."""
    return bool(nested_models(field.annotation)) and get_origin(field.annotation) is None


def key_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, ...]]:
    """One row per key, sections flattened: `eval.judge.model`, `eval.rules[].kind`, `tune.space.*.type`."""
    rows = []
    for name, field in model.model_fields.items():
        key, inner = prefix + name, nested_models(field.annotation)
        if is_section(field):
            rows += key_rows(inner[0], key + ".")
            continue
        rows.append((code(key), text(type_name(field.annotation)), default_of(field), text(field.description)))
        if inner:  # the keys of each item of a list or a map
            rows += key_rows(inner[0], key + ("[]." if get_origin(field.annotation) is list else ".*."))
    return rows


def configuration_page() -> str:
    from tailor.config import TailorConfig

    header = ("key", "type", "default", "meaning")
    fields = TailorConfig.model_fields
    top = [(code(name), text(type_name(field.annotation)), default_of(field), text(field.description))
           for name, field in fields.items() if not is_section(field)]
    sections = ["# Configuration reference (`tailor.yaml`)\n",
                "Generated from the schema (`src/tailor/config.py`) at every build of this site. One file configures "
                "every stage; an unknown key or a bad value stops the command with one line naming the key and what "
                "is allowed. `tailor init` writes a `tailor.yaml` with every key, its default and its meaning, and "
                "any command takes dotted overrides: `tailor train train.learning_rate=1e-4`.\n",
                "`methods.NAME` holds the options of one method; they are listed on the "
                "[methods reference](methods.md).\n",
                "## Top level\n", table(header, top)]
    for name, field in fields.items():
        if is_section(field):
            model = nested_models(field.annotation)[0]
            sections += [f"## `{name}`\n", text(field.description) + "\n", table(header, key_rows(model, name + "."))]
    return "\n".join(sections)


def methods_page() -> str:
    from tailor.methods import registry

    sections = ["# Methods reference\n",
                "Generated from the method registry (`src/tailor/methods/`) at every build of this site, cheapest "
                "first, as `tailor methods` lists them. Pick one with `tailor train --method NAME` (or `train.method`); "
                "set its options under `methods.NAME` in `tailor.yaml`, or on the command line: "
                "`tailor train --method lora methods.lora.r=8`. The [method-choice guide](../tutorials/choosing-a-method.md) "
                "says which to try first.\n"]
    for name in registry.names():
        method = registry.get(name)
        artifact = "set by its options" if method.artifact_for else f"`{method.artifact}`"
        facts = [f"artifact: {artifact}", "trains weights" if method.trains else "trains nothing"]
        if method.grounded:
            facts.append("answers from retrieved passages")
        sections += [f"## `{name}`\n", text(method.summary) + "\n", "; ".join(facts).capitalize() + ".\n"]
        rows = key_rows(method.options, f"methods.{name}.")
        sections.append(table(("key", "type", "default", "meaning"), rows) if rows else "No options.\n")
    return "\n".join(sections)


# --- the Typer app ------------------------------------------------------------------------------------------------

def commands(group, path: str):
    """(`tailor data build`, click command) for every command, depth first, in the order `tailor --help` shows."""
    import typer.core

    for name, command in group.commands.items():
        if isinstance(command, typer.core.TyperGroup):
            yield from commands(command, f"{path} {name}")
        else:
            yield f"{path} {name}", command


def parameter_row(param) -> tuple[str, ...]:
    if param.param_type_name == "argument":
        name = param.name.upper() + ("…" if param.nargs == -1 else "")
        default = "required" if param.required else "optional"
    else:
        name = ", ".join(param.opts + param.secondary_opts)
        default = "flag" if param.is_flag and not param.default else (
            "required" if param.required else code(str(param.default)) if param.default not in (None, ()) else "")
    repeatable = " (repeatable)" if param.param_type_name == "option" and param.multiple else ""
    return code(name) + repeatable, default, text(param.help or "")


def cli_page() -> str:
    import typer.main

    from tailor.cli.app import app

    sections = ["# Command-line reference\n",
                "Generated from the Typer app (`src/tailor/cli/`) at every build of this site; `tailor COMMAND --help` "
                "prints the same. What each command does in depth, with the files it reads and writes: "
                "[commands](commands.md).\n",
                "Every command that reads a workspace takes `-w/--workspace` (the folder with `tailor.yaml`) and, "
                "where a run folder is involved, `-r/--run` (default `WORKSPACE/run`); `KEY=VALUE` arguments override "
                "configuration keys for this command only ([configuration reference](configuration.md)).\n"]
    for path, command in commands(typer.main.get_command(app), "tailor"):
        sections += [f"## `{path}`\n", text(command.help or "") + "\n"]
        rows = [parameter_row(param) for param in command.params]
        sections.append(table(("argument or option", "default", "meaning"), rows) if rows else "No options.\n")
    return "\n".join(sections)


# --- the HTTP API -------------------------------------------------------------------------------------------------

class _SchemaEngine:
    """Just enough of an engine for the app to build its OpenAPI schema: no model is loaded."""

    tokenizer = None

    def model_names(self) -> list[str]:
        return ["base"]


def schema_rows(schema: dict, components: dict, prefix: str = "") -> list[tuple[str, ...]]:
    """One row per field of a request body; nested fields follow (`messages[].role`, `stream_options.include_usage`)."""
    def resolve(node: dict) -> dict:
        return components[node["$ref"].rsplit("/", 1)[-1]] if "$ref" in node else node

    def kind(node: dict) -> str:
        node = resolve(node)
        if "enum" in node:
            return "one of " + ", ".join(map(str, node["enum"]))
        if node.get("type") == "array":
            return f"list of {kind(node['items'])}"
        return node.get("type", node.get("title", "object"))

    rows, body = [], resolve(schema)
    for name, prop in body.get("properties", {}).items():
        default = ("required" if name in body.get("required", []) else
                   code(json.dumps(prop["default"])) if prop.get("default") is not None else "")
        rows.append((code(prefix + name), text(" or ".join(kind(p) for p in prop.get("anyOf", [prop]))), default,
                     text(prop.get("description", ""))))
        for option in map(resolve, prop.get("anyOf", [prop])):  # nested objects: their fields follow
            if "properties" in option:
                rows += schema_rows(option, components, f"{prefix}{name}.")
            elif option.get("type") == "array" and "properties" in resolve(option["items"]):
                rows += schema_rows(resolve(option["items"]), components, f"{prefix}{name}[].")
    return rows


def http_page() -> str:
    from tailor.serve.app import create_app

    schema = create_app(_SchemaEngine()).openapi()  # type: ignore[arg-type]
    components = schema.get("components", {}).get("schemas", {})
    sections = ["# HTTP reference\n",
                "Generated from the server's OpenAPI schema at every build of this site (a running server serves it "
                "at `GET /openapi.json`). The [API guide](../api.md) explains keys, [errors](../api.md#errors), "
                "streaming and citations with examples. Besides these routes: `GET /` (the chat page), `GET /admin` "
                "(the [operations console](../operators/admin.md), on the `/admin/api` routes below) and "
                "`GET /metrics` (Prometheus; the `admin` scope when keys are set).\n"]
    for route, operations in schema["paths"].items():
        for method, operation in operations.items():
            sections.append(f"## `{method.upper()} {route}`\n")
            if operation.get("description"):  # the route's docstring (the summary is only its function's name)
                sections.append(text(re.sub(r"\s+", " ", operation["description"])) + "\n")
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                sections += ["Request body (JSON):\n",
                             table(("field", "type", "default", "meaning"), schema_rows(body, components))]
    return "\n".join(sections)


PAGES = {"reference/configuration.md": configuration_page, "reference/methods.md": methods_page,
         "reference/cli.md": cli_page, "reference/http.md": http_page}


def on_files(files, config):
    for path, render in PAGES.items():
        files.append(File.generated(config, path, content=render()))
    return files
