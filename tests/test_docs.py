"""The documentation builds without a warning or a broken internal link, its examples pass
against a live agent, and what it shows without running it is what the agent does."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import aiohttp
import pytest

from smartmob_agent.config import OPTIONS
from smartmob_agent.model import FailureReason
from tests.agent_process import AgentProcess

DOCS = Path(__file__).resolve().parent.parent / "docs"


BUILDERS = ("html", "doctest")


@pytest.fixture(scope="module")
def docs_builds(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """Both Sphinx builds, started together: they take ~20 and ~30 s, one core each, so
    the suite waits for the longer only."""
    out = tmp_path_factory.mktemp("docs")
    builds = {
        builder: subprocess.Popen(
            [sys.executable, "-m", "sphinx", "-W", "-n", "-q", "-b", builder, str(DOCS),
             str(out / builder)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for builder in BUILDERS
    }
    yield builds
    for build in builds.values():
        if build.poll() is None:  # a test that failed early: do not leave it running
            build.kill()
        build.communicate()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("builder", BUILDERS)
def test_docs_build(builder: str, docs_builds: dict[str, subprocess.Popen[str]]) -> None:
    """sphinx-build -W -n succeeds: no warning, no broken reference, no failing doctest
    (the doctests start the real smartmob-agent and follow the walkthrough), and no
    internal link of the HTML leads nowhere (docs/internal_links.py)."""
    output, _ = docs_builds[builder].communicate(timeout=170)
    assert docs_builds[builder].returncode == 0, output[-8000:]


ROOT = DOCS.parent
#: The pages that show the index without running it as a doctest, and how many times.
INDEX_SHOWN = {"README.rst": 1, "docs/index.rst": 1, "docs/quickstart.rst": 1}
_SHOWN_INDEX = re.compile(r"\$ curl -s http://127\.0\.0\.1:8080/ \| python3 -m json\.tool\n")
#: ``--flag`` and its metavar, as a synopsis, an ``.. option::`` line or ``--help`` give it;
#: `` ...`` after it marks a repeatable option in the synopsis.
_FLAG = re.compile(r"(?<![\w-])(-h, )?(--[a-z][a-z-]*)(?: ([A-Z][A-Z_=]*))?( \.\.\.)?")


def shown_indexes(text: str) -> list[dict[str, str]]:
    """Every index a page shows as the output of ``curl ... | python3 -m json.tool``."""
    decoder = json.JSONDecoder()
    found = []
    for match in _SHOWN_INDEX.finditer(text):
        start = text.index("{", match.end())
        document, _ = decoder.raw_decode(re.sub(r"\n +", "\n", text[start:]))
        found.append(document)
    return found


@pytest.mark.timeout(60)
async def test_the_index_shown_is_the_agents(tmp_path: Path) -> None:
    """The index of the landing page, the quick start and the README (none of them run
    as doctests) is, link for link and in order, what the real agent answers on
    127.0.0.1:8080."""
    agent = await AgentProcess(tmp_path / "state").start()
    try:
        async with aiohttp.ClientSession() as http, http.get(agent.url + "/") as response:
            live = await response.json()
    finally:
        await agent.kill()
    port = agent.url.rsplit(":", 1)[1]
    expected = {name: link.replace(f"127.0.0.1:{port}/", "127.0.0.1:8080/")
                for name, link in live.items()}
    assert len(expected) >= 11
    for page, count in INDEX_SHOWN.items():
        shown = shown_indexes((ROOT / page).read_text())
        assert len(shown) == count, f"{page} shows {len(shown)} indexes"
        for document in shown:
            assert list(document.items()) == list(expected.items()), page


def flags_of(text: str) -> dict[str, str]:
    """``--flag`` -> metavar (``""`` for none) of every flag in ``text``."""
    return {match.group(2): match.group(3) or "" for match in _FLAG.finditer(text)}


def test_the_synopsis_and_the_options_are_those_of_help() -> None:
    """The synopsis of docs/cli.rst and its ``.. option::`` entries name every flag of the
    real ``smartmob-agent --help``, each with its metavar, and nothing else; the synopsis
    marks the repeatable ones with ``...``."""
    result = subprocess.run(
        [sys.executable, "-m", "smartmob_agent", "--help"], capture_output=True, text=True,
        env={**os.environ, "COLUMNS": "200"}, timeout=60, check=True,
    )
    described = result.stdout.partition("\noptions:\n")[2]
    # the first flag of each line that starts an option (the help text may name others)
    starts = (re.match(r"  (?:-\w, )?--[a-z-]+(?: [A-Z][A-Z_=]*)?", line)
              for line in described.splitlines())
    real = flags_of("\n".join(match.group() for match in starts if match))
    assert {"--help", "--version", "--host", "--tls-cert", "--app-token"} <= set(real)
    page = (DOCS / "cli.rst").read_text()
    synopsis = page[page.index("    smartmob-agent ["):page.index("\n\n", page.index("--help"))]
    assert flags_of(synopsis) == real
    assert flags_of("\n".join(re.findall(r"^\.\. option:: (.*)$", page, re.M))) == real
    repeated = {m.group(2) for m in _FLAG.finditer(synopsis) if m.group(4)}
    assert repeated == {option.flag for option in OPTIONS if option.repeat}


def _internal_links() -> ModuleType:
    spec = importlib.util.spec_from_file_location("internal_links", DOCS / "internal_links.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_link_check_finds_missing_files_and_anchors(tmp_path: Path) -> None:
    """The check that the HTML build runs (docs/internal_links.py) is not blind: it finds
    a link to a missing page and to a missing anchor, and lets external links be."""
    (tmp_path / "_modules").mkdir()
    (tmp_path / "index.html").write_text(
        '<h1 id="top">x</h1><a href="#top">ok</a><a href="api.html#gone">anchor</a>'
        '<a href="https://example.com/#x">external</a><a href="_modules/">folder</a>')
    (tmp_path / "api.html").write_text('<span id="here"></span><a href="index.html#top">ok</a>')
    (tmp_path / "_modules" / "index.html").write_text(
        '<a href="time.html">module</a><a href="../api.html#here">ok</a>')
    assert _internal_links().broken_links(tmp_path) == [
        ("_modules/index.html", "time.html", "no such file in the build"),
        ("index.html", "api.html#gone", "no such anchor in the page"),
    ]


def tree_modules(text: str) -> list[str]:
    """The modules the tree of docs/internals.rst lists, dotted (``supervision.agent``)."""
    block = text[text.index("   smartmob_agent/\n"):].split("\n\n", 1)[0].splitlines()[1:]
    modules, package = [], ""
    for line in block:
        name = line.split()[0]
        depth = (len(line) - len(line.lstrip()) - 3) // 4
        if name.endswith("/"):
            assert depth == 1, line
            package = name.rstrip("/")
        else:
            assert name.endswith(".py"), line
            modules.append(name[:-3] if depth == 1 else f"{package}.{name[:-3]}")
    return modules


def test_internals_lists_every_module_and_the_layer_rules() -> None:
    """docs/internals.rst lists each module of the package once in its tree, and states
    the pure modules and what each part may import as tests/test_layers.py enforces them."""
    from tests.test_layers import MAY_IMPORT, MODULES, PURE, SUBPACKAGES

    text = (DOCS / "internals.rst").read_text()
    listed = tree_modules(text)
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert sorted(listed) == sorted(set(MODULES) - SUBPACKAGES), (
        "the tree of docs/internals.rst must list every module, one line each")
    pure = text[text.index(".. pure-modules"):].split("\n\n", 2)[1]
    assert set(re.findall(r"``([\w.]+)``", pure)) == set(PURE)
    table = text[text.index(".. may-import"):text.index("**No aiohttp.web below web.**")]
    rows = re.findall(r"\* - ``([\w_]+)``\n +- (.*)", table)
    assert {part: frozenset(re.findall(r"``([\w_]+)``", cell)) for part, cell in rows} == (
        MAY_IMPORT)


#: Sentences the docs once said that stopped being true (issue 13): pages that are not
#: doctested can drift, so a test keeps these out of every page.
UNTRUE = (
    "no authentication yet",
    "There is no authentication yet",
    "does not terminate TLS itself yet",
    "hence no 401 or 403",
)


def test_sentences_that_became_untrue_stay_out() -> None:
    """The pages that say what the agent does not do say nothing that it now does."""
    for page in [*DOCS.glob("*.rst"), DOCS.parent / "README.rst"]:
        text = " ".join(page.read_text().split())
        for sentence in UNTRUE:
            assert sentence not in text, f"{page.name} says {sentence!r} again"


def test_plain_tox_skips_the_pythons_the_machine_lacks() -> None:
    """``tox`` lists 3.11 to 3.13: without this, plain ``tox`` fails on a machine that has
    only one of them, which is most machines."""
    assert re.search(r"^skip_missing_interpreters\s*=\s*true$",
                     (DOCS.parent / "tox.ini").read_text(), re.MULTILINE)


def test_the_failure_reason_table_is_the_closed_set() -> None:
    """The API reference lists every failure reason a client can switch on, in the
    model's order, and no other (the OpenAPI document takes them from the model)."""
    text = (DOCS / "api.rst").read_text()
    section = text.split(".. _api-failure-reasons:", 1)[1].split("\n.. _", 1)[0]
    header, *shown = re.findall(r"^   \* - ``([a-z ]+)``$", section, re.MULTILINE)
    assert header == "reason"
    assert shown == [reason.value for reason in FailureReason]
