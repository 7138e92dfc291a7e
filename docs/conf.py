"""Sphinx configuration of the smartmob-agent documentation.

Build (warnings are errors, every reference must resolve)::

    sphinx-build -W -n -b html docs docs/_build/html
    sphinx-build -W -n -b doctest docs docs/_build/doctest

The doctest builder starts the real ``smartmob-agent`` command (see ``live_agent.py``)
and runs the walkthrough and the API examples against it.
"""

from __future__ import annotations

import os
import re
import sys
from importlib.metadata import version as _version
from pathlib import Path
from typing import Any

from sphinx.ext import napoleon
from sphinx.util.nodes import make_refnode

HERE = Path(__file__).resolve().parent
# live_agent.py, imported by the testsetup blocks, lives next to this file
sys.path.insert(0, str(HERE))

project = "smartmob-agent"
author = "the smartmob-agent authors"
copyright = "2016-2026, the smartmob-agent authors"
release = _version("smartmob-agent")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.napoleon",  # the docstrings use Google style (Args:, Returns:, Raises:)
    "sphinx.ext.viewcode",
    "internal_links",  # every internal link of the HTML, source pages included, must work
]

# intersphinx links to the Python and aiohttp docs, but fetches their inventories over the
# network, and a failed fetch is a warning (an error under -W). It is opt-in, for builds
# that have network access: SMARTMOB_DOCS_INTERSPHINX=1 sphinx-build ...
if os.environ.get("SMARTMOB_DOCS_INTERSPHINX") == "1":
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "aiohttp": ("https://docs.aiohttp.org/en/stable", None),
    }

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
language = "en"

# every cross-reference must resolve; what lives outside these docs is listed below
nitpicky = True
_EXTERNAL_MODULES = (
    "aiohttp", "web", "asyncio", "subprocess", "psutil", "pathlib", "collections",
    "typing", "types", "enum", "os", "signal", "tarfile", "zipfile", "yarl", "weakref",
    "fastjsonschema", "procfile", "argparse", "logging", "http", "urllib", "threading",
    "multidict", "sqlite3", "hmac", "hashlib", "socket", "queue", "datetime",
    "ipaddress", "re", "prometheus_client",
    "_asyncio",  # where asyncio.Future is defined, as annotations name it
)
nitpick_ignore_regex = [
    # the standard library and third-party packages (no intersphinx offline)
    ("py:.*", r"({})(\..*)?".format("|".join(_EXTERNAL_MODULES))),
    # builtins and typing names that autodoc prints without a module
    ("py:class", r"(Path|Mapping|Callable|Awaitable|Iterable|Sequence|AsyncIterator|Any"
                 r"|Protocol|Exception|BaseException|ValueError|MappingProxyType"
                 r"|Future|Task|Popen|Process|ClientSession|Request|Application"
                 r"|WebSocketResponse|StreamResponse|Response|TestServer|URL|Handler|AppKey|RequestKey"
                 r"|Signals|Enum|str|int|float|bool|bytes|dict|list|tuple|set"
                 r"|frozenset|type|object|None|NoneType)"),
    ("py:(exc|class)", r"(TimeoutError|OSError|KeyError|ChildProcessError)"),
    ("py:(func|meth|class)", r"(os|subprocess|signal)\..*"),
]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {
    "members": True,
    "undoc-members": True,
    "show-inheritance": True,
}
# viewcode would follow an attribute to the module of its value's class (a field whose
# default is time.monotonic, a module constant that is a FetchPolicy) and file the
# module's source page under the wrong page: its "[docs]" links then lead nowhere, and
# the index of source pages lists a "time" page that is never written. Each object is
# documented in the module that defines it, so there is nothing to follow.
viewcode_follow_imported_members = False

napoleon_google_docstring = True
napoleon_numpy_docstring = False

# the doctests print what they check; a failed one says which page and line
doctest_show_successes = True
doctest_test_doctest_blocks = "default"

html_theme = "alabaster"
html_title = f"smartmob-agent {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Runs Procfile applications on request, over a hypermedia REST API.",
    "fixed_sidebar": True,
}


def _resolve_short_names(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve a short Python reference (``InvalidTransition``) to the package's object.

    Docstrings name objects of other modules of the package by their short name, as
    Python code does after an import; Sphinx looks them up only in the current module.
    A name that matches exactly one object of the package resolves to it.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    domain = env.get_domain("py")
    matches = [
        name for name in domain.objects
        if name.startswith("smartmob_agent.") and name.endswith("." + target)
    ]
    if len(matches) != 1:
        return None
    entry = domain.objects[matches[0]]
    return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id,
                        contnode, matches[0])


def _google_docstrings(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """Napoleon, except for data and attributes.

    Napoleon reads the first ``text: more`` of an attribute's docstring as ``type:
    description``, which mangles comments such as ``#: Receives batches of lines: ...``.
    """
    if what not in {"data", "attribute", "property"}:
        napoleon._process_docstring(app, what, name, obj, options, lines)
        _untype_returns(lines)


def _untype_returns(lines: list[str]) -> None:
    """Put back the words napoleon took for the type of a ``Returns:`` section.

    The docstrings give no return type there (the signature shows it), but napoleon reads
    a first line such as ``One outcome per process, in creation order: ...`` as ``type:
    description``, and the "type" becomes an unresolvable reference. So every ``:rtype:``
    it made is joined back to the front of its ``:returns:`` text.
    """
    for index, line in enumerate(lines):
        if not line.startswith(":rtype: "):
            continue
        words = line.removeprefix(":rtype: ")
        for back in range(index - 1, -1, -1):
            if lines[back].startswith(":returns: "):
                rest = lines[back].removeprefix(":returns: ")
                lines[back] = f":returns: {words}: {rest}"
                del lines[index]
                break
        else:
            lines[index] = f":returns: {words}"
        return


def _readable_defaults(
    app: Any, what: str, name: str, obj: Any, options: Any, signature: str | None,
    return_annotation: str | None,
) -> tuple[str | None, str | None] | None:
    """Show function defaults (``clock=time.monotonic``) by name, not by their repr.

    A repr such as ``<built-in function monotonic>`` is not Python, and Sphinx then
    falls back to a crude reading of the whole signature.
    """
    if signature is None or "<" not in signature:
        return None
    signature = re.sub(r"<(?:built-in )?function (\w+)(?: at 0x[0-9a-f]+)?>", r"\1", signature)
    return signature, return_annotation


def setup(app: Any) -> None:
    app.connect("missing-reference", _resolve_short_names)
    app.connect("autodoc-process-signature", _readable_defaults)
    for listener in list(app.events.listeners.get("autodoc-process-docstring", ())):
        if listener.handler is napoleon._process_docstring:
            app.disconnect(listener.id)
            app.connect("autodoc-process-docstring", _google_docstrings)
