"""The cache of downloaded source archives, in the state folder (a files + HTTP adapter).

Knows nothing of processes. :meth:`SourceCache.get` returns the path of a complete
archive file for a source, downloading it (through :func:`.download.fetch`) only when it
must:

* A source with a checksum is kept under that checksum, once verified: any later
  request for it, from any URL, reads the file and makes no request at all. An archive
  that does not match is never kept.
* A source without one is kept under its URL, with the ``ETag`` and ``Last-Modified``
  its server sent. The next request asks the server with a conditional GET
  (``If-None-Match``, ``If-Modified-Since``): ``304 Not Modified`` reuses the file, any
  ``200`` replaces it. A URL may serve a new version at any time (``latest.tar.gz``), so
  it is asked every time; a server that sends neither header is downloaded from again.
* Concurrent requests for the same source share one download (single flight): ten
  processes of one app created at once make one request, whatever the server says. It
  carries the headers of the first of them (its ``X-Request-Id``); each sees its
  progress. The download is cancelled only when every one of them gave up waiting.

Files are written under a temporary name and renamed into place, so a partial or
unverified file is never served, and a reader that opened the previous version of an
entry keeps reading it. The agent's unpacking of an entry is what gives each process a
copy of its own.

:meth:`SourceCache.collect` removes the entries no process uses, except the
:data:`KEEP_UNUSED` most recently used of them (for rollbacks); an entry's modification
time is when it was last used.

:meth:`SourceCache.put` takes in an archive sent to the agent (the ``upload`` link):
streamed to disk while its SHA-256 is computed, checked by its first bytes, bounded in
size, and kept under its checksum like a verified download, so a create request with
that ``checksum`` finds it without any request. Its upload counts as its last use, and
it is marked as uploaded so the agent serves it back (:meth:`SourceCache.uploaded`)
without exposing the archives it downloaded.

The small file operations (a ``stat``, a rename, a little JSON) run on the event loop's
thread: they take microseconds, and doing them there keeps them ordered with the garbage
collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from smartmob_agent.errors import (
    ArchiveError,
    ChecksumMismatch,
    DownloadError,
    StorageError,
    TooLarge,
)
from smartmob_agent.sources import download, unpack
from smartmob_agent.sources.fetchpolicy import FetchPolicy

log = logging.getLogger("smartmob_agent.sources")  # stable name: internals.rst

#: Entries that no process uses, kept (the most recently used first) for rollbacks.
KEEP_UNUSED = 3
#: The suffixes of an entry's archive, of its validators, and of a file being written.
_ARCHIVE = ".archive"
_META = ".json"
_PART = ".part"
#: Bytes of an upload read before its format is checked (a tar's magic is at 257).
_HEAD = 512
#: What :meth:`SourceCache.put` writes in an uploaded entry's metadata file.
_UPLOADED = {"uploaded": True}


def cache_key(url: str, sha256: str | None) -> str:
    """The name of the cache entry of a source: its checksum when known, else its URL's.

    >>> cache_key("http://example.com/a.tgz", "ab" * 32)[:15]
    'sha256-abababab'
    >>> cache_key("http://example.com/a.tgz", None)[:12]
    'url-4e12cd64'
    """
    if sha256 is not None:
        return f"sha256-{sha256}"
    return "url-" + hashlib.sha256(url.encode()).hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise :class:`.ChecksumMismatch` (a :class:`DownloadError`) unless the file has
    the SHA-256 ``expected`` (lowercase hex). Blocking: run it in a thread."""
    with open(path, "rb") as file:
        actual = hashlib.file_digest(file, "sha256").hexdigest()
    if actual != expected:
        raise ChecksumMismatch(
            f"the downloaded archive does not match its checksum: its sha256 is {actual}, "
            f"the create request says {expected}; nothing was unpacked"
        )


@dataclass(frozen=True)
class Stored:
    """An archive taken into the cache by :meth:`SourceCache.put`."""

    #: its SHA-256, lowercase hex: the key a create request's ``checksum`` finds it by
    sha256: str
    #: its size in bytes
    size: int
    #: its format, as :func:`.unpack.detect_format` names it
    format: str


def _upload_format(head: bytes) -> str:
    """The archive format of an upload's first bytes.

    Raises:
        ArchiveError: it is not a zip or tar archive, in words for who sent it.
    """
    try:
        return unpack.detect_format(head)
    except ArchiveError as error:
        reason = str(error).replace("the source", "the uploaded body", 1)
        raise ArchiveError(
            f"{reason}: send the archive's bytes themselves as the request body "
            "(curl --data-binary @app.tgz)"
        ) from None


@contextlib.contextmanager
def _storing(folder: Path) -> Iterator[None]:
    """Turn an error of the disk into a :class:`StorageError` that names ``folder``."""
    try:
        yield
    except OSError as error:
        raise StorageError(
            f"the archive could not be kept in {folder}: {error.strerror or error}"
        ) from None


def _failed(task: asyncio.Task[Path]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)


@dataclass
class _Flight:
    """One download in progress, and who waits for it."""

    task: asyncio.Task[Path] | None = None
    waiters: int = 0
    progress: tuple[int, int | None] | None = None
    listeners: list[download.Progress] = field(default_factory=list)

    def report(self, size: int, total: int | None) -> None:
        self.progress = (size, total)
        for listener in list(self.listeners):
            listener(size, total)


class SourceCache:
    """The archives of one folder, and the downloads that fill it.

    Args:
        folder: where entries are kept (created if needed); files a download left
            half-written there (the agent was killed) are removed.
        session: the HTTP client of the downloads.
        limits: the bounds of each download (the defaults of
            :class:`.download.DownloadLimits` if not given).
        keep: how many unused entries :meth:`collect` keeps.
        policy: which URLs, and redirects, downloads may follow (any http or https URL
            but the refused addresses, if not given).
    """

    def __init__(
        self,
        folder: Path,
        session: aiohttp.ClientSession,
        limits: download.DownloadLimits | None = None,
        *,
        keep: int = KEEP_UNUSED,
        policy: FetchPolicy | None = None,
    ) -> None:
        self.folder = folder
        self.keep = keep
        self._session = session
        self._limits = limits or download.DownloadLimits()
        #: which URLs (and redirects) may be fetched (see :mod:`.fetchpolicy`)
        self.policy = policy or FetchPolicy()
        self._flights: dict[tuple[str, str], _Flight] = {}
        #: downloads started (conditional ones included), and bytes written by them: what
        #: the agent's metrics show
        self.downloads = 0
        self.downloaded_bytes = 0
        folder.mkdir(parents=True, exist_ok=True)
        for path in folder.iterdir():
            if path.name.endswith(_PART):
                path.unlink(missing_ok=True)

    def path(self, key: str) -> Path:
        """The archive file of the entry ``key`` (see :func:`cache_key`)."""
        return self.folder / f"{key}{_ARCHIVE}"

    def keys(self) -> set[str]:
        """The entries the folder holds."""
        return {
            path.name.removesuffix(_ARCHIVE)
            for path in self.folder.iterdir() if path.name.endswith(_ARCHIVE)
        }

    async def get(
        self,
        url: str,
        sha256: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        progress: download.Progress | None = None,
    ) -> Path:
        """Return the path of the archive of ``url`` (of SHA-256 ``sha256``, if given),
        downloading it if the cache cannot vouch for the file it has.

        ``headers`` go with the download this call starts (not with one it joins);
        ``progress`` is called as :func:`.download.download` calls it, with the progress
        so far at once when joining a download under way.

        Raises:
            DownloadError: the download failed (every waiter gets the error), or the
                archive does not match ``sha256``.
        """
        key = cache_key(url, sha256)
        if sha256 is not None and self._touch(key):
            return self.path(key)
        flight_key = (key, url)
        flight = self._flights.get(flight_key)
        if flight is not None and flight.task is not None and _failed(flight.task):
            flight = None  # it just failed: not a result to share with a newcomer
        if flight is None:
            flight = _Flight()
            flight.task = asyncio.get_running_loop().create_task(
                self._fill(key, url, sha256, dict(headers or {}), flight.report),
                name=f"download {download.display_url(url)}",
            )
            self._flights[flight_key] = flight
            flight.task.add_done_callback(lambda _: self._landed(flight_key, flight))
        task = flight.task
        assert task is not None
        flight.waiters += 1
        if progress is not None:
            flight.listeners.append(progress)
            if flight.progress is not None:
                progress(*flight.progress)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if flight.waiters == 1 and not task.done():
                # the last one waiting: nobody wants it any more; a later call starts afresh
                self._landed(flight_key, flight)
                task.cancel()
                await asyncio.wait({task})
            raise
        finally:
            flight.waiters -= 1
            if progress is not None and progress in flight.listeners:
                flight.listeners.remove(progress)

    def _landed(self, flight_key: tuple[str, str], flight: _Flight) -> None:
        if self._flights.get(flight_key) is flight:
            del self._flights[flight_key]
        task = flight.task
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # each waiter got it; it needs no "never retrieved" warning

    async def _fill(
        self,
        key: str,
        url: str,
        sha256: str | None,
        headers: dict[str, str],
        report: download.Progress,
    ) -> Path:
        """Download into the entry ``key`` (or confirm it is current); return its path."""
        final = self.path(key)
        part = self.folder / f"{key}.{uuid.uuid4().hex}{_PART}"
        known = download.Validators() if sha256 is not None else self._validators(key)
        try:
            self.downloads += 1
            fetched = await download.fetch(
                self._session, url, part, limits=self._limits, headers=headers,
                progress=report, validators=known or None, policy=self.policy,
            )
            self.downloaded_bytes += fetched.size
            if not fetched.modified:
                if self._touch(key):
                    log.info("%s: not modified, using the cached archive",
                             download.display_url(url))
                    return final
                # gone since it was asked about: download it whole
                self.downloads += 1
                fetched = await download.fetch(
                    self._session, url, part, limits=self._limits, headers=headers,
                    progress=report, policy=self.policy,
                )
                self.downloaded_bytes += fetched.size
            try:
                if sha256 is not None:
                    await asyncio.to_thread(verify_sha256, part, sha256)
                # the old validators go first: they must never describe a newer file
                self._meta(key).unlink(missing_ok=True)
                os.replace(part, final)
                if sha256 is None and fetched.validators:
                    self._write_validators(key, url, fetched.validators)
            except OSError as error:  # a full disk, for instance
                raise DownloadError(
                    f"the archive from {download.display_url(url)} could not be kept in "
                    f"{self.folder}: {error.strerror or error}"
                ) from None
            return final
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()

    def _meta(self, key: str) -> Path:
        return self.folder / f"{key}{_META}"

    def _touch(self, key: str) -> bool:
        """Mark the entry ``key`` used now; ``False`` if there is no such entry."""
        # the time is given, to the nanosecond: the kernel's own "now" for a file moves
        # by clock ticks, and entries used within one tick would tie in collect()
        now = time.time_ns()
        try:
            os.utime(self.path(key), ns=(now, now))
        except FileNotFoundError:
            return False
        return True

    def _validators(self, key: str) -> download.Validators:
        """The validators of the entry ``key``, if it has a file and they were recorded."""
        if not self.path(key).is_file():
            return download.Validators()
        try:
            data = json.loads(self._meta(key).read_text())
            etag, modified = data.get("etag"), data.get("last_modified")
        except (OSError, ValueError, AttributeError):
            return download.Validators()
        return download.Validators(
            etag if isinstance(etag, str) else None,
            modified if isinstance(modified, str) else None,
        )

    def _write_validators(self, key: str, url: str, validators: download.Validators) -> None:
        self._write_meta(key, {
            "url": download.display_url(url),
            "etag": validators.etag,
            "last_modified": validators.last_modified,
        })

    def _write_meta(self, key: str, data: Mapping[str, object]) -> None:
        meta = self._meta(key)
        part = self.folder / f"{meta.name}.{uuid.uuid4().hex}{_PART}"
        part.write_text(json.dumps(data))
        os.replace(part, meta)

    async def put(self, chunks: AsyncIterable[bytes], *, max_bytes: int) -> Stored:
        """Keep the archive that ``chunks`` make up, as they arrive, under its SHA-256;
        mark it uploaded, and used now.

        The body is never held whole in memory: each chunk is hashed and written as it
        comes, to a temporary file renamed into place once complete, so a body that
        fails a check or stops coming leaves nothing behind. The same bytes sent again
        make the same entry.

        Raises:
            TooLarge: the body is over ``max_bytes`` (found while reading, at the chunk
                that passes it).
            ArchiveError: the body is empty, or not a zip or tar archive by its first
                bytes (found once they arrived, before the rest is read).
            StorageError: the file cannot be written (a full or read-only disk).
        """
        part = self.folder / f"upload.{uuid.uuid4().hex}{_PART}"
        digest = hashlib.sha256()
        size = 0
        head = b""
        kind: str | None = None
        try:
            # only the file's errors are the disk's: one reading the body (a client
            # that went away) goes up as it is
            with _storing(self.folder):
                file = part.open("wb")
            with file:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(
                            f"the archive is over the limit of {max_bytes} bytes (the "
                            "agent's --max-download, which bounds uploads too)"
                        )
                    if kind is None:
                        head += chunk[:_HEAD - len(head)]
                        if len(head) >= _HEAD:
                            kind = _upload_format(head)
                    digest.update(chunk)
                    with _storing(self.folder):
                        file.write(chunk)
                with _storing(self.folder):
                    file.flush()  # so closing it has nothing left to fail on
            if kind is None:  # shorter than the head
                kind = _upload_format(head)
            sha256 = digest.hexdigest()
            key = cache_key("", sha256)
            with _storing(self.folder):
                os.replace(part, self.path(key))
                self._write_meta(key, _UPLOADED)
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        self._touch(key)  # the upload is its last use: kept like a source just used
        log.info("kept an uploaded %s archive of %d bytes, sha256 %s", kind, size, sha256)
        return Stored(sha256, size, kind)

    def uploaded(self, sha256: str) -> Path | None:
        """The archive file of the upload of SHA-256 ``sha256`` (lowercase hex), or
        ``None`` if there is none. Archives the agent downloaded are not uploads: those
        may come from URLs with credentials, and are not served back."""
        key = cache_key("", sha256)
        try:
            data = json.loads(self._meta(key).read_text())
        except (OSError, ValueError):
            return None
        path = self.path(key)
        if not (isinstance(data, dict) and data.get("uploaded") is True and path.is_file()):
            return None
        return path

    def collect(self, in_use: Iterable[str]) -> list[str]:
        """Remove the entries not in ``in_use`` (nor being downloaded), except the
        ``keep`` most recently used of them; return the keys removed."""
        busy = set(in_use) | {key for key, _ in self._flights}
        unused: list[tuple[int, str]] = []
        for key in self.keys() - busy:
            with contextlib.suppress(FileNotFoundError):
                unused.append((self.path(key).stat().st_mtime_ns, key))
        unused.sort(reverse=True)
        removed = [key for _, key in unused[self.keep:]]
        for key in removed:
            self._meta(key).unlink(missing_ok=True)
            self.path(key).unlink(missing_ok=True)
        if removed:
            log.info("removed %d unused source archive(s) from %s", len(removed), self.folder)
        return removed
