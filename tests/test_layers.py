"""The layering rules of ``docs/internals.rst``, enforced on the package's import statements.

Modules are named by their dotted path inside the package (``supervision.watcher``; a
package's ``__init__`` by the package's name, the top one as ``__init__``). The rules are
stated on packages, so a new module placed in a package is checked without being listed;
only the pure modules (parsing, policy, documents) are listed by name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

import smartmob_agent

PACKAGE = Path(smartmob_agent.__file__).parent
NAME = "smartmob_agent"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or "__init__"


MODULES = sorted(_module_name(path) for path in PACKAGE.rglob("*.py"))
SUBPACKAGES = frozenset(
    _module_name(path.parent / "__init__.py") for path in PACKAGE.glob("*/__init__.py")
)

#: Parsing, policy and documents: pure functions and data, no I/O of their own.
PURE = frozenset({
    "__init__", "errors", "model", "keys", "schemas", "queries", "representations", "config",
    "supervision.restart", "supervision.failures",
    "sources.procfile", "sources.dotenv", "sources.decode", "sources.fetchpolicy",
    "sources.buildplan",
    "output.lines",
    "output.redact",
    "output.endpoint",
    "web.frames", "web.access", "web.openapi",
    "host.control", "host.shape", "host.sections",
    "client.errors", "client.results", "client.ignore", "client.render", "client.formation",
    "client.manifest", "client.plan",
}) & frozenset(MODULES)
#: What each part of the tree may import, besides the pure modules and itself. The
#: adapters (processes, sources, output, events, store) touch one kind of outside resource
#: each; ``supervision`` puts them together; ``web`` and the CLI are the interfaces.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "store": frozenset(),
    "output": frozenset(),
    "events": frozenset(),
    # the machine's figures (psutil); plugins get process snapshots, pure data
    "host": frozenset(),
    # a child's output is split into lines as it is read
    "processes": frozenset({"output"}),
    # a build's pip and release commands are children, reaped as such
    "sources": frozenset({"processes"}),
    "supervision": frozenset({"processes", "sources", "output", "events", "store"}),
    "web": frozenset({
        "supervision", "processes", "sources", "output", "events", "store", "host",
    }),
    "cli": frozenset({"supervision", "processes", "output", "web", "store"}),
    # the client speaks HTTP only: it imports none of the agent's internals
    "client": frozenset(),
    "__main__": frozenset({"cli"}),
}

#: Outside resources that pure modules must not touch.
FORBIDDEN_IN_PURE = frozenset({"asyncio", "aiohttp", "sqlite3", "subprocess", "socket"})
#: Calls that read or write files: a pure module makes none.
FILE_CALLS = frozenset({
    "open", "read_text", "read_bytes", "write_text", "write_bytes", "mkdir", "unlink",
    "rmtree", "iterdir", "rglob", "scandir", "listdir",
})


def part_of(module: str) -> str:
    """The part of the tree ``module`` belongs to (its subpackage, else its own name)."""
    return module.split(".")[0]


def _resolve(dotted: str) -> str:
    """The package module that an import of ``smartmob_agent.<dotted>`` loads."""
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted or "__init__"


def scan(source: str, module: str = "") -> tuple[frozenset[str], frozenset[str]]:
    """Return (outside imports, package modules) that ``source`` imports.

    Outside imports are dotted as far as the statement names them (``from aiohttp import
    web`` is ``aiohttp.web``). Every import counts, including those inside functions or
    ``if TYPE_CHECKING``.
    """
    outside: set[str] = set()
    inside: set[str] = set()
    here = module.split(".")[:-1] if module not in SUBPACKAGES else module.split(".")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top, _, rest = alias.name.partition(".")
                if top == NAME:
                    inside.add(_resolve(rest))
                else:
                    outside.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the package
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                prefix = ".".join([*base, *([node.module] if node.module else [])])
                for alias in node.names:
                    inside.add(_resolve(f"{prefix}.{alias.name}".strip(".")))
                continue
            assert node.module is not None
            top, _, rest = node.module.partition(".")
            if top == "__future__":
                continue
            if top != NAME:
                outside.add(node.module)
                outside.update(f"{node.module}.{alias.name}" for alias in node.names)
                continue
            for alias in node.names:  # from smartmob_agent.sources import download, X
                inside.add(_resolve(f"{rest}.{alias.name}".strip(".")))
    inside.discard(module)
    return frozenset(outside), frozenset(inside)


def _path(module: str) -> Path:
    if module == "__init__":
        return PACKAGE / "__init__.py"
    relative = Path(*module.split("."))
    if module in SUBPACKAGES:
        return PACKAGE / relative / "__init__.py"
    return PACKAGE / relative.with_suffix(".py")


@cache
def imports_of(module: str) -> tuple[frozenset[str], frozenset[str]]:
    """What the package module ``module`` imports, as :func:`scan` reports it."""
    return scan(_path(module).read_text(), module)


def file_calls(module: str) -> frozenset[str]:
    """The file-touching calls (:data:`FILE_CALLS`) that ``module`` makes."""
    found = set()
    for node in ast.walk(ast.parse(_path(module).read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else (
                func.attr if isinstance(func, ast.Attribute) else "")
            if name in FILE_CALLS:
                found.add(name)
    return frozenset(found)


def test_every_module_has_a_place() -> None:
    """Each module is pure, or lives in a part of the tree that has import rules."""
    unplaced = [m for m in MODULES if m not in PURE and part_of(m) not in MAY_IMPORT
                and m not in SUBPACKAGES]
    assert not unplaced, "add the module to PURE or its part to MAY_IMPORT: " + str(unplaced)


def test_the_scanner_sees_every_form_of_import() -> None:
    """The scanner finds plain, dotted, from, relative and nested imports (it is not blind)."""
    source = """
from __future__ import annotations
import os.path
import asyncio, json as j
from aiohttp import web
from smartmob_agent import __version__
from smartmob_agent.sources import download
from smartmob_agent.model import Exit
import smartmob_agent.processes.spawn
from . import hub
from .lines import LineSplitter
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from smartmob_agent.supervision.agent import Agent
def later():
    import subprocess
    from smartmob_agent import cli
"""
    outside, inside = scan(source, "output.logs")
    assert outside == {
        "os.path", "asyncio", "json", "aiohttp", "aiohttp.web", "typing",
        "typing.TYPE_CHECKING", "subprocess",
    }
    assert inside == {
        "__init__", "sources.download", "model", "processes.spawn", "output.hub",
        "output.lines", "supervision.agent", "cli",
    }


@pytest.mark.parametrize("module", sorted(PURE))
def test_pure_modules_touch_no_outside_resource(module: str) -> None:
    """A pure module imports no asyncio, aiohttp, sqlite3, subprocess or socket, and reads
    or writes no file."""
    outside, _ = imports_of(module)
    assert not {name.split(".")[0] for name in outside} & FORBIDDEN_IN_PURE
    assert not file_calls(module)


@pytest.mark.parametrize("module", sorted(PURE))
def test_pure_modules_import_only_pure_modules(module: str) -> None:
    """The pure modules import nothing but each other."""
    _, inside = imports_of(module)
    assert inside <= PURE | SUBPACKAGES, sorted(inside - PURE - SUBPACKAGES)


@pytest.mark.parametrize("module", sorted(set(MODULES) - PURE - SUBPACKAGES))
def test_each_part_imports_only_what_it_may(module: str) -> None:
    """Adapters import pure modules and the parts :data:`MAY_IMPORT` allows; supervision
    imports no ``web``; nothing imports the CLI."""
    _, inside = imports_of(module)
    allowed = MAY_IMPORT[part_of(module)] | {part_of(module)}
    wrong = {m for m in inside if m not in PURE and part_of(m) not in allowed}
    assert not wrong, f"{module} imports {sorted(wrong)}"


@pytest.mark.parametrize("module", MODULES)
def test_only_the_interfaces_use_the_server_side_of_aiohttp(module: str) -> None:
    """Nothing outside ``web`` and the CLI imports ``aiohttp.web``."""
    if part_of(module) in {"web", "cli"}:
        return
    outside, _ = imports_of(module)
    server = {n for n in outside if n == "aiohttp.web" or n.startswith("aiohttp.web")}
    assert not server, f"{module} imports {sorted(server)}"


def test_supervision_does_not_import_the_web_layer() -> None:
    """Stated on its own, since it is the rule that keeps the lifecycle testable alone."""
    for module in MODULES:
        if part_of(module) == "supervision":
            _, inside = imports_of(module)
            assert not {m for m in inside if part_of(m) == "web"}, module


def test_guardian_uses_only_the_standard_library() -> None:
    """The guardian imports nothing but the standard library (and proctable and privacy,
    which import only that too), so it starts fast and alone."""
    outside, inside = imports_of("processes.guardian")
    helpers = {"processes.proctable", "processes.privacy"}
    assert inside <= {*helpers, "processes", "__init__"}
    stdlib = sys.stdlib_module_names
    for helper in helpers:
        assert imports_of(helper)[1] <= {"processes", "__init__"}, helper
        assert {n.split(".")[0] for n in imports_of(helper)[0]} <= stdlib, helper
    assert {n.split(".")[0] for n in outside} <= stdlib, sorted(outside)
    for package_init in ("__init__", "processes"):
        assert {n.split(".")[0] for n in imports_of(package_init)[0]} <= stdlib


def test_routes_are_registered_by_the_app_factory_only() -> None:
    """No module of ``web`` adds a route at import time, to its own application or to
    another module's table: each handler module fills a route table of its own, and
    ``web.server`` registers every table explicitly."""
    for module in MODULES:
        if part_of(module) != "web":
            continue
        tree = ast.parse(_path(module).read_text())
        own_tables = {
            target.id for node in tree.body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)
            and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute)
            and node.value.func.attr == "RouteTableDef"
        }
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for decorator in node.decorator_list:
                    if (isinstance(decorator, ast.Call)
                            and isinstance(decorator.func, ast.Attribute)
                            and isinstance(decorator.func.value, ast.Name)
                            and decorator.func.attr in {"get", "post", "route", "view"}):
                        table = decorator.func.value.id
                        assert table in own_tables, (
                            f"{module}: {node.name} is added to {table}, a table of another "
                            "module, when imported")
                continue  # a function body may register routes when called
            calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)
                     and isinstance(n.func, ast.Attribute)
                     and n.func.attr in {"add_routes", "add_route", "add_get", "add_post"}]
            assert not calls, f"{module} line {node.lineno} registers a route at import time"


#: What each check runs in a fresh interpreter for a module ``{name}``.
_IMPORT_ALONE = "import {name}"
_PURE_IMPORT = (
    "import sys, {name}\n"
    "loaded = {{'asyncio', 'aiohttp', 'sqlite3', 'subprocess'}} & set(sys.modules)\n"
    "print(','.join(sorted(loaded)))\n"
)


@pytest.fixture(scope="module")
def fresh_imports() -> dict[tuple[str, str], subprocess.CompletedProcess[str]]:
    """Every module imported in a fresh interpreter (each check of this module), four
    at a time: a hundred Python start-ups one after the other took the suite 13 s."""
    checks = [(_IMPORT_ALONE, module) for module in MODULES]
    checks += [(_PURE_IMPORT, module) for module in sorted(PURE)]

    def run(check: tuple[str, str]) -> subprocess.CompletedProcess[str]:
        code, module = check
        name = NAME if module == "__init__" else f"{NAME}.{module}"
        return subprocess.run(
            [sys.executable, "-c", code.format(name=name)],
            capture_output=True, text=True, timeout=60, check=False,
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(checks, pool.map(run, checks), strict=True))


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(
    module: str, fresh_imports: dict[tuple[str, str], subprocess.CompletedProcess[str]],
) -> None:
    """Each module imports in a fresh interpreter on its own (no circular import)."""
    result = fresh_imports[_IMPORT_ALONE, module]
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", sorted(PURE))
def test_pure_modules_pull_in_no_io_framework(
    module: str, fresh_imports: dict[tuple[str, str], subprocess.CompletedProcess[str]],
) -> None:
    """Importing a pure module does not load asyncio, aiohttp, sqlite3 or subprocess."""
    result = fresh_imports[_PURE_IMPORT, module]
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
