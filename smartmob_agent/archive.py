"""Fetching and unpacking source archives (the HTTP + filesystem adapter).

Knows nothing of processes. :func:`download` streams a URL to a file, never holding the
body in memory; :func:`detect_format` recognises zip and tar (plain, gzip, bzip2, xz)
by their first bytes, whatever the server claimed; :func:`unpack` extracts into a fresh
folder and refuses any member that could land outside it. Anything unsafe or broken
raises :class:`~smartmob_agent.errors.ArchiveError` and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from yarl import URL

from smartmob_agent.errors import ArchiveError, DownloadError

_CHUNK = 64 * 1024

#: First bytes of each format we accept, and the name used in messages.
_MAGIC = (
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),  # an empty zip
    (b"\x1f\x8b", "tar.gz"),
    (b"BZh", "tar.bz2"),
    (b"\xfd7zXZ\x00", "tar.xz"),
)
_TAR_MAGIC_OFFSET = 257


@dataclass(frozen=True)
class DownloadLimits:
    """Bounds on one download."""

    max_bytes: int = 512 * 1024 * 1024
    stall: float = 30.0
    total: float = 600.0


def display_url(url: str) -> str:
    """Return ``url`` without any user name or password, for messages and logs."""
    try:
        return str(URL(url).with_user(None))
    except (ValueError, TypeError):
        return "the source URL"


async def download(
    session: aiohttp.ClientSession,
    url: str,
    dest: Path,
    *,
    limits: DownloadLimits = DownloadLimits(),
    headers: dict[str, str] | None = None,
) -> int:
    """Stream ``url`` into the file ``dest``; return the number of bytes written.

    Raises:
        DownloadError: for an HTTP status other than 200, a network failure, a stall, a
            timeout or a body over the size limit. ``dest`` is removed in that case.
    """
    shown = display_url(url)
    timeout = aiohttp.ClientTimeout(
        total=limits.total, sock_connect=limits.stall, sock_read=limits.stall
    )
    size = 0
    try:
        async with session.get(url, timeout=timeout, headers=headers) as response:
            if response.status != 200:
                raise DownloadError(
                    f"downloading {shown} failed: the server answered "
                    f"{response.status} {response.reason or ''}".rstrip()
                )
            if response.content_length is not None and response.content_length > limits.max_bytes:
                raise DownloadError(
                    f"downloading {shown} failed: the archive is {response.content_length} "
                    f"bytes, over the limit of {limits.max_bytes}"
                )
            with dest.open("wb") as file:
                async for chunk in response.content.iter_chunked(_CHUNK):
                    size += len(chunk)
                    if size > limits.max_bytes:
                        raise DownloadError(
                            f"downloading {shown} failed: the archive is over the limit "
                            f"of {limits.max_bytes} bytes"
                        )
                    file.write(chunk)
    except DownloadError:
        dest.unlink(missing_ok=True)
        raise
    except asyncio.TimeoutError:
        dest.unlink(missing_ok=True)
        raise DownloadError(
            f"downloading {shown} failed: no data for {limits.stall:g} s or more than "
            f"{limits.total:g} s in all"
        ) from None
    except aiohttp.ClientConnectorError as error:
        dest.unlink(missing_ok=True)
        reason = error.os_error.strerror or str(error.os_error)
        raise DownloadError(
            f"downloading {shown} failed: could not connect to {error.host}:{error.port} "
            f"({reason})"
        ) from None
    except (aiohttp.ClientError, OSError) as error:
        dest.unlink(missing_ok=True)
        raise DownloadError(f"downloading {shown} failed: {error or type(error).__name__}") from None
    return size


def detect_format(head: bytes) -> str:
    """Name the archive format of a file from its first 512 bytes.

    Raises:
        ArchiveError: if it is neither zip nor tar, saying what it looks like instead.
    """
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[_TAR_MAGIC_OFFSET:_TAR_MAGIC_OFFSET + 5] == b"ustar":
        return "tar"
    sniff = head[:200].lstrip().lower()
    if sniff.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        looks = "an HTML page"
    elif sniff.startswith((b"{", b"[")):
        looks = "JSON"
    elif not head:
        looks = "empty"
    else:
        looks = "something else"
    raise ArchiveError(f"the source is not a zip or tar archive (it is {looks})")


def unpack(archive: Path, dest: Path) -> Path:
    """Extract ``archive`` into the new folder ``dest``; return the source root.

    The root is ``dest`` itself, or its only entry when the archive holds one top-level
    folder and nothing else (as GitHub's archives do). Blocking: run it in a thread.

    Raises:
        ArchiveError: unknown format, a corrupt archive, or an unsafe member (absolute
            path, ``..``, a link out of the tree, a device or fifo); ``dest`` is then
            removed, so nothing half-written is left.
    """
    with archive.open("rb") as file:
        kind = detect_format(file.read(512))
    dest.mkdir(parents=True)
    try:
        if kind == "zip":
            _unpack_zip(archive, dest)
        else:
            _unpack_tar(archive, dest, kind)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return source_root(dest)


def source_root(folder: Path) -> Path:
    """Return ``folder``, or its single sub-folder if that is all it contains."""
    entries = list(folder.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return folder


def _unpack_tar(archive: Path, dest: Path, kind: str) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            # the "data" filter refuses absolute paths, "..", links leaving the tree,
            # devices and fifos, and drops setuid/setgid bits
            tar.extractall(dest, filter="data")
    except tarfile.FilterError as error:
        raise ArchiveError(f"the {kind} archive is unsafe to unpack: {error}") from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        raise ArchiveError(f"the {kind} archive is corrupt or truncated: {error}") from None


def _inside(root: Path, path: str) -> bool:
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


def _check_member_name(name: str) -> None:
    if "\x00" in name:
        raise ArchiveError("the zip archive is unsafe to unpack: a member name contains NUL")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(parts[0]) == 2 and parts[0][1] == ":"):
        raise ArchiveError(f"the zip archive is unsafe to unpack: {name!r} is an absolute path")
    if ".." in parts:
        raise ArchiveError(f"the zip archive is unsafe to unpack: {name!r} contains '..'")


def _unpack_zip(archive: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zip_file:
            for info in zip_file.infolist():
                _extract_zip_member(zip_file, info, dest)
    except zipfile.BadZipFile as error:
        raise ArchiveError(f"the zip archive is corrupt or truncated: {error}") from None
    except (EOFError, OSError, ValueError, NotImplementedError) as error:
        raise ArchiveError(f"the zip archive is corrupt or unsupported: {error}") from None


def _extract_zip_member(zip_file: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path) -> None:
    name = info.filename
    _check_member_name(name)
    target = os.path.join(dest, *[part for part in name.split("/") if part not in ("", ".")])
    if not _inside(dest, os.path.dirname(target)) or not _inside(dest, target):
        raise ArchiveError(f"the zip archive is unsafe to unpack: {name!r} leaves the folder")
    mode = info.external_attr >> 16
    if info.is_dir():
        os.makedirs(target, exist_ok=True)
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if stat.S_ISLNK(mode):
        link = zip_file.read(info).decode("utf-8", "replace")
        resolved = os.path.join(os.path.dirname(target), link)
        if os.path.isabs(link) or not _inside(dest, resolved):
            raise ArchiveError(
                f"the zip archive is unsafe to unpack: link {name!r} points outside the folder"
            )
        os.symlink(link, target)
        return
    if mode and not stat.S_ISREG(mode):
        raise ArchiveError(
            f"the zip archive is unsafe to unpack: {name!r} is not a regular file"
        )
    with zip_file.open(info) as source, open(target, "xb") as out:
        shutil.copyfileobj(source, out, _CHUNK)
    # keep only the executable bits (scripts named in a Procfile need them)
    with contextlib.suppress(OSError):
        os.chmod(target, 0o755 if mode & 0o111 else 0o644)
