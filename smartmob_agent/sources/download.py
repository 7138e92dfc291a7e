"""Downloading source archives (the HTTP adapter, and ``file://`` sources).

Knows nothing of processes, nor of what is inside an archive (that is
:mod:`~smartmob_agent.sources.unpack`). :func:`download` streams a URL to a file, never
holding the body in memory, reporting its progress if asked (:func:`fetch` does the same
with a conditional GET), going only where the
:class:`~smartmob_agent.sources.fetchpolicy.FetchPolicy` allows: the URL, each redirect
and, through the session of :func:`open_session`, the addresses a host name resolves to.
Anything refused, too big, broken or cancelled raises
:class:`~smartmob_agent.errors.DownloadError` and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from smartmob_agent.errors import DownloadError
from smartmob_agent.sources.fetchpolicy import FetchPolicy
from smartmob_agent.sources.threads import run_cancellable

_CHUNK = 64 * 1024
#: Most redirects followed for one download.
MAX_REDIRECTS = 10
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: The policy of a fetch not given one: http and https, refused addresses refused.
_ANY_HOST = FetchPolicy()


@dataclass(frozen=True)
class DownloadLimits:
    """Bounds on one download."""

    max_bytes: int = 512 * 1024 * 1024
    stall: float = 30.0
    total: float = 600.0


def display_url(url: str) -> str:
    """Return ``url`` without any user name or password, for messages and logs."""
    try:
        parsed = URL(url)
        if parsed.raw_user is None and parsed.raw_password is None:
            return str(parsed)
        return str(parsed.with_user(None))
    except (ValueError, TypeError):
        return "the source URL"


@dataclass(frozen=True)
class Validators:
    """What a server said identifies the version of a body it sent (``ETag``,
    ``Last-Modified``), as given: sent back to ask whether that version is still current."""

    etag: str | None = None
    last_modified: str | None = None

    def __bool__(self) -> bool:
        return self.etag is not None or self.last_modified is not None

    def conditions(self) -> dict[str, str]:
        """The headers of a conditional GET: ``If-None-Match``, ``If-Modified-Since``."""
        headers = {}
        if self.etag is not None:
            headers["If-None-Match"] = self.etag
        if self.last_modified is not None:
            headers["If-Modified-Since"] = self.last_modified
        return headers


@dataclass(frozen=True)
class Fetched:
    """What :func:`fetch` got."""

    #: ``False`` when the server answered ``304 Not Modified`` to a conditional GET:
    #: nothing was written
    modified: bool
    #: bytes written to the file (0 when not modified)
    size: int
    #: those of the answer (of the new body, or confirmed by a ``304``)
    validators: Validators


#: Called as ``progress(bytes_so_far, total)`` while a body arrives; ``total`` is ``None``
#: when the server did not say how long the body is.
Progress = Callable[[int, int | None], None]


async def download(
    session: aiohttp.ClientSession,
    url: str,
    dest: Path,
    *,
    limits: DownloadLimits = DownloadLimits(),
    headers: dict[str, str] | None = None,
    progress: Progress | None = None,
    policy: FetchPolicy = _ANY_HOST,
) -> int:
    """Stream ``url`` into the file ``dest``; return the number of bytes written.

    ``progress`` is called once the answer's headers arrived, then after each chunk.

    Raises:
        DownloadError: for an HTTP status other than 200, a network failure, a stall, a
            timeout, a body over the size limit, a URL that is not valid or that ``policy``
            refuses (or a redirect it refuses). ``dest`` is removed in that case, and
            also when the download is cancelled.
    """
    fetched = await fetch(
        session, url, dest, limits=limits, headers=headers, progress=progress, policy=policy
    )
    return fetched.size


async def fetch(
    session: aiohttp.ClientSession,
    url: str,
    dest: Path,
    *,
    limits: DownloadLimits = DownloadLimits(),
    headers: dict[str, str] | None = None,
    progress: Progress | None = None,
    validators: Validators | None = None,
    policy: FetchPolicy = _ANY_HOST,
) -> Fetched:
    """Like :func:`download`, but a conditional GET when ``validators`` are given: a
    ``304 Not Modified`` answer then leaves ``dest`` alone and says so. Either way the
    answer's own validators are returned, for the next time.

    ``url`` and every redirect are checked against ``policy`` before any request (the
    addresses a host name resolves to are checked by the session's resolver: see
    :func:`open_session`); redirects are followed up to :data:`MAX_REDIRECTS` times. A
    ``file://`` URL the policy allows is copied from its file (no validators then).

    Raises:
        DownloadError: as :func:`download` (a ``304`` to a plain GET is an error too),
            and for a URL or a redirect the policy refuses.
    """
    shown = display_url(url)
    is_file = url[:5].lower() == "file:"
    failed = f"{'reading' if is_file else 'downloading'} {shown} failed"
    problem = policy.check_url(url)
    deadline = asyncio.timeout(limits.total)
    try:
        if problem is not None:
            raise DownloadError(f"{failed}: {problem}")
        async with deadline:
            if is_file:
                return await _read_file(policy, url, dest, limits, progress)
            return await _get(session, url, dest, limits, headers, progress, validators, policy)
    except DownloadError:
        _discard(dest)
        raise
    except (TimeoutError, aiohttp.ClientError, OSError) as error:
        _discard(dest)
        raise _failure(error, failed, url, shown, limits, deadline.expired()) from None
    except BaseException:  # cancelled: leave nothing half-written either
        _discard(dest)
        raise


def _failure(
    error: TimeoutError | aiohttp.ClientError | OSError, failed: str, url: str, shown: str,
    limits: DownloadLimits, expired: bool,
) -> DownloadError:
    """The error a person reads for what went wrong during a fetch.

    Args:
        failed: the start of the sentence (``"downloading URL failed"``).
        shown: the URL as messages show it (without its password).
        expired: whether the time limit of the whole fetch had passed.
    """
    if isinstance(error, TimeoutError):
        if expired:
            reason = f"it took more than {limits.total:g} s in all (the time limit)"
        elif isinstance(error, aiohttp.ConnectionTimeoutError):
            reason = f"could not connect within {limits.stall:g} s (the stall limit)"
        else:
            reason = f"no data for {limits.stall:g} s (the stall limit)"
        return DownloadError(f"{failed}: {reason}")
    if isinstance(error, aiohttp.InvalidURL):
        return DownloadError(f"{failed}: the URL is not valid")
    if isinstance(error, aiohttp.ClientConnectorError):
        os_error = error.os_error
        # asyncio's "Connect call failed (...)" hides the reason a person understands
        if isinstance(os_error, RefusedAddress):
            return DownloadError(f"{failed}: {os_error}")
        if os_error.errno is not None and os_error.errno > 0:
            reason = os.strerror(os_error.errno)
        else:  # a name-resolution error carries its own text
            reason = os_error.strerror or str(os_error)
        return DownloadError(
            f"{failed}: could not connect to {error.host}:{error.port} ({reason})"
        )
    # never echo a password that was part of the URL
    reason = str(error).replace(url, shown) or type(error).__name__
    return DownloadError(f"{failed}: {reason}")


async def _get(
    session: aiohttp.ClientSession,
    url: str,
    dest: Path,
    limits: DownloadLimits,
    headers: dict[str, str] | None,
    progress: Progress | None,
    validators: Validators | None,
    policy: FetchPolicy,
) -> Fetched:
    """GET ``url`` into ``dest``, following redirects the policy allows."""
    shown = display_url(url)
    # the deadline of the whole download is fetch's: a total per request would restart
    # at each redirect
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=limits.stall, sock_read=limits.stall
    )
    sent = dict(headers or {})
    if validators:
        sent.update(validators.conditions())
    origin = URL(url)
    credentials = aiohttp.BasicAuth.from_url(origin)
    target: str | URL = url
    hop_headers = sent
    for _ in range(MAX_REDIRECTS + 1):
        async with session.get(
            target, timeout=timeout, headers=hop_headers, allow_redirects=False
        ) as response:
            if response.status not in _REDIRECTS:
                return await _receive(response, dest, limits, progress, validators, shown)
            location = response.headers.get("Location")
            if not location:
                raise DownloadError(
                    f"downloading {shown} failed: the server answered {response.status} "
                    "(a redirect) without a Location"
                )
            try:
                following = response.url.join(URL(location))
                if following.raw_user is not None or following.raw_password is not None:
                    following = following.with_user(None)
            except (ValueError, TypeError):
                following = None
            if following is None or not following.scheme:
                raise DownloadError(
                    f"downloading {shown} failed: it redirects to a URL that is not valid"
                )
            problem = policy.check_url(str(following), redirect=True)
            if problem is not None:
                raise DownloadError(
                    f"downloading {shown} failed: it redirects to "
                    f"{display_url(str(following))}, which is refused: {problem}"
                )
            # a user and password of the URL go to its own origin only
            hop_headers = sent
            if credentials is not None and _same_origin(following, origin):
                hop_headers = {**sent, "Authorization": credentials.encode()}
            target = following
    raise DownloadError(
        f"downloading {shown} failed: more than {MAX_REDIRECTS} redirects (the limit)"
    )


def _same_origin(one: URL, other: URL) -> bool:
    """Whether two URLs have the same scheme, host and port."""
    return (one.scheme, one.host, one.port) == (other.scheme, other.host, other.port)


async def _receive(
    response: aiohttp.ClientResponse,
    dest: Path,
    limits: DownloadLimits,
    progress: Progress | None,
    validators: Validators | None,
    shown: str,
) -> Fetched:
    """Stream the body of a final (not a redirect) answer into ``dest``."""
    answered = Validators(response.headers.get("ETag"), response.headers.get("Last-Modified"))
    if response.status == 304 and validators:
        # the validators of a 304 may be left out: those sent still hold then
        return Fetched(False, 0, answered or validators)
    if response.status != 200:
        raise DownloadError(
            f"downloading {shown} failed: the server answered "
            f"{response.status} {response.reason or ''}".rstrip()
        )
    # Content-Length counts compressed bytes when the body is sent compressed (and the
    # body is counted as decoded): not a total of what is written then
    encoded = response.headers.get("Content-Encoding", "identity").lower() != "identity"
    total = None if encoded else response.content_length
    if total is not None and total > limits.max_bytes:
        raise DownloadError(
            f"downloading {shown} failed: the archive is {total} bytes, over the limit "
            f"of {limits.max_bytes}"
        )
    if progress is not None:
        progress(0, total)
    size = 0
    with dest.open("wb") as file:
        async for chunk in response.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > limits.max_bytes:
                raise DownloadError(
                    f"downloading {shown} failed: the archive is over the limit "
                    f"of {limits.max_bytes} bytes"
                )
            file.write(chunk)
            if progress is not None:
                progress(size, total)
    return Fetched(True, size, answered)


#: Bytes read at a time from a file source (in a thread).
_FILE_CHUNK = 1024 * 1024


async def _read_file(
    policy: FetchPolicy, url: str, dest: Path, limits: DownloadLimits,
    progress: Progress | None,
) -> Fetched:
    """Copy the file of a ``file://`` URL the policy allows into ``dest``, in a thread.

    A cancel (or the time limit) asks the thread to stop and waits for it: its file is
    never closed under a read still running.
    """
    shown = display_url(url)
    root = policy.file_root
    try:
        parts = policy.file_parts(url)
    except ValueError as error:
        raise DownloadError(f"reading {shown} failed: {error}") from None
    assert root is not None, "file_parts() refuses file URLs without a root"
    loop = asyncio.get_running_loop()

    def report(size: int, total: int | None) -> None:
        if progress is not None:
            loop.call_soon_threadsafe(progress, size, total)

    try:
        size = await run_cancellable(
            lambda stop: _copy_beneath(Path(root), parts, dest, limits.max_bytes, stop, report)
        )
    except _TooLarge as error:
        raise DownloadError(
            f"reading {shown} failed: the archive is "
            + (f"{error.size} bytes, over the limit of {limits.max_bytes}" if error.size
               else f"over the limit of {limits.max_bytes} bytes")
        ) from None
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            reason = (
                "its path goes through a symbolic link or a file that is not a folder "
                "(file sources are read without following links)"
            )
        elif error.errno == errno.EISDIR:
            reason = "it is not a regular file"
        else:
            reason = error.strerror or str(error)
        raise DownloadError(f"reading {shown} failed: {reason}") from None
    return Fetched(True, size, Validators())


class _TooLarge(Exception):
    """A file source is over the size limit (``size``: as it said, 0 if it grew)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def _copy_beneath(
    root: Path, parts: tuple[str, ...], dest: Path, max_bytes: int, stop: threading.Event,
    report: Progress,
) -> int:
    """Copy the regular file ``root/parts...`` (see :func:`_open_beneath`) into ``dest``,
    reporting progress; return its size. Blocking: run it in a thread.

    Raises:
        OSError: the file cannot be opened or read (see :func:`_open_beneath`), or
            ``stop`` was set (``ECANCELED``).
        _TooLarge: the file is over ``max_bytes``.
    """
    fd = _open_beneath(root, parts)
    try:
        total = os.fstat(fd).st_size
        if total > max_bytes:
            raise _TooLarge(total)
        report(0, total)
        size = 0
        with dest.open("wb") as file:
            while chunk := os.read(fd, _FILE_CHUNK):
                if stop.is_set():
                    raise OSError(errno.ECANCELED, "cancelled")
                size += len(chunk)
                if size > max_bytes:  # it grew while being read
                    raise _TooLarge(0)
                file.write(chunk)
                report(size, total)
        return size
    finally:
        os.close(fd)


def _open_beneath(root: Path, parts: tuple[str, ...]) -> int:
    """Open the regular file ``root/parts...`` for reading, following no symbolic link
    below ``root`` (so no link inside the folder leads out of it); return its descriptor.

    Raises:
        OSError: ``ELOOP`` or ``ENOTDIR`` for a link on the way, ``EISDIR`` for anything
            but a regular file (a fifo is opened without blocking, then refused).
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    folder = os.open(root, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            inner = os.open(part, flags | os.O_DIRECTORY, dir_fd=folder)
            os.close(folder)
            folder = inner
        fd = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=folder)
    finally:
        os.close(folder)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(errno.EISDIR, "not a regular file")
    return fd


class RefusedAddress(OSError):
    """A host name resolved to an address the fetch policy refuses."""


class GuardedResolver(AbstractResolver):
    """A resolver that refuses a host name resolving to an address the policy refuses.

    The connector connects to exactly the addresses its resolver returns, so checking them
    here, at each connection, leaves no gap between the check and the connection for DNS
    rebinding. Hosts written as addresses never reach a resolver: :func:`fetch` checks them
    from the URL, and every redirect too.

    Args:
        policy: the rules (:meth:`.FetchPolicy.check_address`).
        inner: the resolver that does the work (aiohttp's default if not given).
    """

    def __init__(self, policy: FetchPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            problem = self._policy.check_address(result["host"])
            if problem is not None:
                raise RefusedAddress(f"the host {host!r} resolves to a refused address: {problem}")
        return results

    async def close(self) -> None:
        await self._inner.close()


class _GuardedConnector(aiohttp.TCPConnector):
    """A connector that closes the resolver it was given, as it does its own."""

    def __init__(self, resolver: GuardedResolver) -> None:
        super().__init__(resolver=resolver)
        self._guard = resolver

    async def close(self, *, abort_ssl: bool = False) -> None:
        await super().close(abort_ssl=abort_ssl)
        await self._guard.close()


def open_session(
    policy: FetchPolicy, *, resolver: AbstractResolver | None = None
) -> aiohttp.ClientSession:
    """An HTTP client session whose connections go only to addresses ``policy`` allows
    (see :class:`GuardedResolver`; ``resolver`` replaces aiohttp's default, in tests).
    Bodies sent with a ``Content-Encoding`` are decoded, and counted as decoded."""
    connector = _GuardedConnector(GuardedResolver(policy, resolver))
    return aiohttp.ClientSession(connector=connector, auto_decompress=True)


def _discard(path: Path) -> None:
    """Remove a partial download, if there is one."""
    path.unlink(missing_ok=True)

