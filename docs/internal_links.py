"""A Sphinx extension: once the HTML is written, every internal link must lead somewhere.

Sphinx checks the references of the pages it reads, but not the links of the pages it
generates, such as the source pages of ``sphinx.ext.viewcode`` (``_modules/...``), whose
"[docs]" links once pointed at anchors no page had. This reads every written HTML file
and warns (an error under ``-W``) for each link to a file of the build that does not
exist, or to an anchor that the file does not have. External links (with a scheme or a
host) are not followed: the build must work offline. Usable alone too::

    python docs/internal_links.py docs/_build/html
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


class _Page(HTMLParser):
    """The anchors (``id`` and ``name``) and the link targets (``href``) of one page."""

    def __init__(self) -> None:
        super().__init__()
        self.anchors: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in {"id", "name"} and value:
                self.anchors.add(value)
            elif name == "href" and tag == "a" and value is not None:
                self.links.append(value)


def broken_links(root: Path) -> list[tuple[str, str, str]]:
    """Every internal link of the HTML files under ``root`` that leads nowhere.

    Returns:
        ``(page, link, why)`` triples, the page relative to ``root``, sorted.
    """
    root = root.resolve()
    pages: dict[Path, _Page] = {}
    for path in root.rglob("*.html"):
        page = _Page()
        page.feed(path.read_text(encoding="utf-8"))
        pages[path] = page
    broken = []
    for path, page in pages.items():
        for link in page.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc:
                continue  # external: not checked offline
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if target.is_dir():
                target = target / "index.html"
            where = str(path.relative_to(root))
            if target not in pages:
                if not target.exists():
                    broken.append((where, link, "no such file in the build"))
                continue
            if parts.fragment and unquote(parts.fragment) not in pages[target].anchors:
                broken.append((where, link, "no such anchor in the page"))
    return sorted(broken)


def _check_build(app: Any, exception: BaseException | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    for page, link, why in broken_links(Path(app.outdir)):
        logger.warning("broken internal link %s in %s: %s", link, page, why)


def setup(app: Any) -> dict[str, Any]:
    """Register the check to run after each HTML build."""
    app.connect("build-finished", _check_build)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":
    found = broken_links(Path(sys.argv[1]))
    for entry in found:
        print(*entry)
    sys.exit(1 if found else 0)
