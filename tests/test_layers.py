"""The layering rule of style.md, enforced on the package's import statements."""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

import smartmob_agent

PACKAGE = Path(smartmob_agent.__file__).parent
NAME = "smartmob_agent"

PURE_CORE = frozenset({
    "__init__", "errors", "model", "procfile", "policy", "lines", "config",
    "representations", "frames", "schemas", "dotenv", "auth", "fetchpolicy", "build",
    "openapi",
})
ADAPTERS = frozenset({
    "archive", "child", "hub", "proctable", "ports", "events", "webhooks", "monitor", "health",
    "store", "sources", "logs", "builder",
})
#: The exceptions to "adapters never import each other": the child finds escaped
#: descendants through the process table; a health command is a child, reaped as one;
#: the source cache fills itself through the archive downloads; a build's pip and release
#: command are children, reaped as such.
ADAPTER_IMPORTS = {
    "child": frozenset({"proctable"}), "health": frozenset({"child"}),
    "sources": frozenset({"archive"}), "builder": frozenset({"child"}),
}
ORCHESTRATION = frozenset({"watcher", "agent"})
INTERFACES = frozenset({
    "api", "ws", "links", "server", "cli", "guardian", "__main__", "eventsocket",
})
LAYERS = {
    **dict.fromkeys(PURE_CORE, 1),
    **dict.fromkeys(ADAPTERS, 2),
    **dict.fromkeys(ORCHESTRATION, 3),
    **dict.fromkeys(INTERFACES, 4),
}

#: Outside resources the pure core must not touch.
FORBIDDEN_IN_CORE = frozenset({"asyncio", "aiohttp", "sqlite3", "subprocess", "socket"})

MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))


def scan(source: str, module: str = "") -> tuple[frozenset[str], frozenset[str]]:
    """Return (top-level outside packages, package modules) that ``source`` imports.

    Every import counts, including those inside functions or ``if TYPE_CHECKING``.
    """
    outside: set[str] = set()
    inside: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top, _, rest = alias.name.partition(".")
                if top == NAME:
                    inside.add(rest.split(".")[0] or "__init__")
                else:
                    outside.add(top)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the package
                base = (node.module or "").split(".")[0]
                names = [base] if base else [alias.name for alias in node.names]
                inside.update(name if name in MODULES else "__init__" for name in names)
                continue
            assert node.module is not None
            top, _, rest = node.module.partition(".")
            if top == "__future__":
                continue
            if top != NAME:
                outside.add(top)
            elif rest:
                inside.add(rest.split(".")[0])
            else:  # from smartmob_agent import archive, __version__
                inside.update(
                    alias.name if alias.name in MODULES else "__init__" for alias in node.names
                )
    inside.discard(module)
    return frozenset(outside), frozenset(inside)


@cache
def imports_of(module: str) -> tuple[frozenset[str], frozenset[str]]:
    """What the package module ``module`` imports, as :func:`scan` reports it."""
    return scan((PACKAGE / f"{module}.py").read_text(), module)


def test_every_module_has_a_layer() -> None:
    """Each module of the package is placed in exactly one layer (add new ones here)."""
    assert set(MODULES) == set(LAYERS), "classify the new module in tests/test_layers.py"


def test_the_scanner_sees_every_form_of_import() -> None:
    """The scanner finds plain, dotted, from, relative and nested imports (it is not blind)."""
    source = """
from __future__ import annotations
import os.path
import asyncio, json as j
from aiohttp import web
from smartmob_agent import archive, __version__
from smartmob_agent.model import Exit
import smartmob_agent.child
from . import hub
from .lines import LineSplitter
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from smartmob_agent.agent import Agent
def later():
    import subprocess
    from smartmob_agent import cli
"""
    outside, inside = scan(source)
    assert outside == {"os", "asyncio", "json", "aiohttp", "typing", "subprocess"}
    assert inside == {"archive", "__init__", "model", "child", "hub", "lines", "agent", "cli"}


@pytest.mark.parametrize("module", sorted(PURE_CORE))
def test_pure_core_touches_no_outside_resource(module: str) -> None:
    """The pure core imports no asyncio, aiohttp, sqlite3, subprocess or socket."""
    outside, _ = imports_of(module)
    assert not outside & FORBIDDEN_IN_CORE


@pytest.mark.parametrize("module", sorted(PURE_CORE))
def test_pure_core_imports_only_pure_core(module: str) -> None:
    """The pure core imports nothing from adapters, orchestration or interfaces."""
    _, inside = imports_of(module)
    assert inside <= PURE_CORE, sorted(inside - PURE_CORE)


@pytest.mark.parametrize("module", sorted(ADAPTERS))
def test_adapters_import_only_the_pure_core(module: str) -> None:
    """An adapter imports only the pure core, never another adapter or anything above."""
    _, inside = imports_of(module)
    allowed = PURE_CORE | ADAPTER_IMPORTS.get(module, frozenset())
    assert inside <= allowed, sorted(inside - allowed)


@pytest.mark.parametrize("module", sorted(ORCHESTRATION))
def test_orchestration_does_not_import_interfaces(module: str) -> None:
    """Watcher and agent import the core and adapters, never the interfaces."""
    _, inside = imports_of(module)
    assert not inside & INTERFACES, sorted(inside & INTERFACES)


@pytest.mark.parametrize("module", sorted(set(MODULES) - INTERFACES))
def test_nothing_below_imports_an_interface(module: str) -> None:
    """No module below the interfaces imports one of them, nor a module of a higher layer."""
    _, inside = imports_of(module)
    higher = {name for name in inside if LAYERS.get(name, 0) > LAYERS[module]}
    assert not higher, f"{module} (layer {LAYERS[module]}) imports {sorted(higher)}"


def test_guardian_uses_only_the_standard_library() -> None:
    """guardian.py imports nothing but the standard library (and proctable, which imports
    only that too), so it starts fast and alone."""
    outside, inside = imports_of("guardian")
    assert inside <= {"proctable"}
    assert imports_of("proctable")[1] == frozenset()
    assert imports_of("proctable")[0] <= sys.stdlib_module_names
    assert outside <= sys.stdlib_module_names, sorted(outside - sys.stdlib_module_names)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module: str) -> None:
    """Each module imports in a fresh interpreter on its own (no circular import)."""
    name = NAME if module == "__init__" else f"{NAME}.{module}"
    result = subprocess.run(
        [sys.executable, "-c", f"import {name}"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", sorted(PURE_CORE))
def test_pure_core_pulls_in_no_io_framework(module: str) -> None:
    """Importing a pure-core module does not load asyncio, aiohttp, sqlite3 or subprocess."""
    name = NAME if module == "__init__" else f"{NAME}.{module}"
    code = (
        f"import sys, {name}\n"
        "loaded = {'asyncio', 'aiohttp', 'sqlite3', 'subprocess'} & set(sys.modules)\n"
        "print(','.join(sorted(loaded)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
