"""The archives and builds the agent keeps for its processes: uploads taken in and found
again, and what no process uses any more collected.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from smartmob_agent.errors import NotFound, TooLarge
from smartmob_agent.sources.builds import Builds
from smartmob_agent.sources.cache import SourceCache, cache_key
from smartmob_agent.supervision.watcher import Watcher

log = logging.getLogger("smartmob_agent.agent")  # stable name: its messages were the agent's


def collect_unused(sources: SourceCache, builds: Builds, watchers: Iterable[Watcher]) -> None:
    """Remove the cached archives no process uses, but for the last few (rollbacks), and
    the builds no process uses; a full or read-only disk is logged, never raised (it must
    not fail a delete)."""
    watchers = list(watchers)
    in_use = {cache_key(w.spec.source_url, w.spec.sha256) for w in watchers}
    # and the archive a rollback brings back
    in_use |= {cache_key(p.source_url, p.sha256)
               for p in (w.releases.previous[0] for w in watchers if w.releases.previous)}
    try:
        sources.collect(in_use)
    except OSError as error:
        log.warning("could not clean the source cache %s: %s", sources.folder, error)
    # a process whose source is not fetched yet has no key: it looks for its build
    # only once it has one, and builds again if it is gone
    used = {w.build_key for w in watchers}
    try:
        builds.collect(key for key in used if key is not None)
    except OSError as error:
        log.warning("could not clean the builds %s: %s", builds.folder, error)


def check_upload_size(length: int | None, limit: int) -> None:
    """Refuse an upload whose announced ``length`` is over ``limit`` (``--max-download``).

    Raises:
        TooLarge: it is.
    """
    if length is not None and length > limit:
        raise TooLarge(
            f"the archive is {length} bytes, over the limit of {limit} bytes (the "
            "agent's --max-download, which bounds uploads too)"
        )


def find_upload(sources: SourceCache | None, sha256: str) -> Path:
    """The file of the uploaded archive of SHA-256 ``sha256`` (hex, either case).

    Raises:
        NotFound: no upload has it (never uploaded, collected, or not a SHA-256).
    """
    path = None
    if len(sha256) == 64 and all(c in "0123456789abcdefABCDEF" for c in sha256):
        path = None if sources is None else sources.uploaded(sha256.lower())
    if path is None:
        raise NotFound(
            f"there is no uploaded archive with SHA-256 {sha256[:64]!r} (never "
            "uploaded, or removed as unused by the source cache's collection)"
        )
    return path
