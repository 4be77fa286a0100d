"""The documentation site: `mkdocs build --strict` passes (a broken link, a missing page or #anchor fails it), and the
references generated from the code hold every configuration key, command, method option and HTTP route, each with
a description. The walks here are written apart from docs/hooks.py on purpose: they check its output, not reuse it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import get_args, get_origin

import pytest
import typer.core
import typer.main
from pydantic import BaseModel

from tailor.cli.app import app
from tailor.config import TailorConfig

ROOT = Path(__file__).resolve().parents[3]
MKDOCS = Path(sys.executable).with_name("mkdocs")


def models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in models_in(arg)]


def config_keys(model: type[BaseModel], prefix: str = ""):
    """(dotted key, field) for every key a user can write: `ingest.pii`, `eval.rules[].kind`, `tune.space.*.low`."""
    for name, field in model.model_fields.items():
        inner, container = models_in(field.annotation), get_origin(field.annotation)
        if inner and container is None:
            yield from config_keys(inner[0], f"{prefix}{name}.")
            continue
        yield prefix + name, field
        if inner:
            yield from config_keys(inner[0], prefix + name + ("[]." if container is list else ".*."))


def cli_commands(group, path: str = "tailor"):
    for name, command in group.commands.items():
        if isinstance(command, typer.core.TyperGroup):
            yield from cli_commands(command, f"{path} {name}")
        else:
            yield f"{path} {name}", command


def method_options():
    from tailor.methods import registry

    for name in registry.names():
        yield name, registry.get(name), list(config_keys(registry.get(name).options, f"methods.{name}."))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    assert MKDOCS.is_file(), f"{MKDOCS} is missing: install the docs tools with pip install -e '.[docs]'"
    out = tmp_path_factory.mktemp("site")
    built = subprocess.run([str(MKDOCS), "build", "--strict", "--site-dir", str(out)], cwd=ROOT, text=True,
                           capture_output=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stderr[-4000:]}"
    return out


def page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text(encoding="utf-8")


def test_the_site_builds_with_every_page_of_the_nav(site):
    for name in ("tutorials/your-documents", "tutorials/city-demo", "tutorials/choosing-a-method", "api", "faq",
                 "operators/deployment", "benchmarks", "grounded-answers", "reference/configuration"):
        assert (site / name / "index.html").is_file(), name


def test_configuration_reference_lists_every_key(site):
    html = page(site, "reference/configuration")
    missing = [key for key, _ in config_keys(TailorConfig) if f"<code>{key}</code>" not in html]
    assert not missing, f"keys missing from the generated configuration reference: {missing}"
    assert "<code>retrieval.url</code>" in html and "<code>eval.rules[].kind</code>" in html


def test_cli_reference_lists_every_command_and_option(site):
    html = page(site, "reference/cli")
    for path, command in cli_commands(typer.main.get_command(app)):
        assert f"<code>{path}</code>" in html, path
        for option in (p for p in command.params if p.param_type_name == "option"):
            assert f"<code>{', '.join(option.opts + option.secondary_opts)}</code>" in html, (path, option.name)


def test_methods_reference_lists_every_method_and_option(site):
    html = page(site, "reference/methods")
    for name, _, options in method_options():
        assert f"<code>{name}</code>" in html, name
        assert all(f"<code>{key}</code>" in html for key, _ in options), name


def test_http_reference_lists_every_route(site):
    from tailor.serve.admin.routes import router as console_router
    from tailor.serve.openai.routes import router

    html = page(site, "reference/http")
    for route in [*router.routes, *console_router.routes]:
        for method in route.methods:
            assert f"<code>{method} {route.path}</code>" in html, route.path


def test_every_key_command_option_and_method_has_a_description():
    undocumented = [key for key, field in config_keys(TailorConfig) if not (field.description or "").strip()]
    for path, command in cli_commands(typer.main.get_command(app)):
        if not (command.help or "").strip():
            undocumented.append(path)
        undocumented += [f"{path} {p.name}" for p in command.params if not (p.help or "").strip()]
    for name, method, options in method_options():
        if not method.summary.strip():
            undocumented.append(f"method {name}")
        undocumented += [key for key, field in options if not (field.description or "").strip()]
    assert not undocumented, f"give these a description (help text): {undocumented}"


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 15_000
    assert "make demo" in readme and "make test" in readme
