"""What the settings allow the processes' sources and notify URLs.

Where a ``source_url`` may be fetched from (:func:`fetch_policy`), how much a source may
weigh, downloaded and unpacked (:func:`download_limits`, :func:`unpack_limits`), and
where a ``notify`` URL may point (:data:`NOTIFY_POLICY`).
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath

from smartmob_agent.config import Settings
from smartmob_agent.errors import InvalidRequest
from smartmob_agent.model import Spec
from smartmob_agent.sources import download, unpack
from smartmob_agent.sources.fetchpolicy import FetchPolicy

#: Where webhooks may be posted: anywhere but link-local and cloud metadata addresses.
#: The ``--source-allow`` list is for sources, not for receivers, so it does not apply.
NOTIFY_POLICY = FetchPolicy()


def check_notify(spec: Spec) -> None:
    """Refuse a ``notify`` URL aimed at a refused address (a metadata service).

    Raises:
        InvalidRequest: naming the URL's index in ``notify`` and why.
    """
    for index, url in enumerate(spec.options.notify):
        problem = NOTIFY_POLICY.check_url(url)
        if problem is not None:
            detail = f"the URL at position {index} is refused: {problem}"
            raise InvalidRequest(f"notify: {detail}", {"notify": detail})


def fetch_policy(settings: Settings) -> FetchPolicy:
    """The fetch policy the settings give (``--source-allow``, ``--allow-file-sources``)."""
    root = settings.allow_file_sources
    return FetchPolicy(
        settings.source_allow, None if root is None else PurePosixPath(os.path.normpath(root))
    )


def download_limits(settings: Settings) -> download.DownloadLimits:
    """The bounds of each download the settings give."""
    return download.DownloadLimits(
        max_bytes=settings.max_download,
        stall=settings.download_stall,
        total=settings.download_timeout,
    )


def unpack_limits(settings: Settings) -> unpack.UnpackLimits:
    """The bounds of each unpack the settings give."""
    return unpack.UnpackLimits(
        max_members=settings.max_members,
        max_total_bytes=settings.max_unpacked,
        max_member_bytes=settings.max_member_size,
        max_path_length=settings.max_path_length,
        max_ratio=settings.max_ratio,
    )
