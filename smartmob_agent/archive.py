"""Fetching and unpacking source archives (the HTTP + filesystem adapter).

Knows nothing of processes. :func:`download` streams a URL to a file, never holding the
body in memory; :func:`detect_format` recognises zip and tar (plain, gzip, bzip2, xz)
by their first bytes, whatever the server claimed; :func:`unpack` extracts into a fresh
folder and refuses any member that could land outside it. Anything unsafe or broken
raises :class:`~smartmob_agent.errors.ArchiveError` and leaves nothing behind.
"""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
            timeout, a body over the size limit or a URL that is not valid. ``dest`` is
            removed in that case, and also when the download is cancelled.
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
        _discard(dest)
        raise
    except TimeoutError:
        _discard(dest)
        raise DownloadError(
            f"downloading {shown} failed: no data for {limits.stall:g} s or more than "
            f"{limits.total:g} s in all"
        ) from None
    except aiohttp.InvalidURL:
        _discard(dest)
        raise DownloadError(f"downloading {shown} failed: the URL is not valid") from None
    except aiohttp.ClientConnectorError as error:
        _discard(dest)
        os_error = error.os_error
        # asyncio's "Connect call failed (...)" hides the reason a person understands
        if os_error.errno is not None and os_error.errno > 0:
            reason = os.strerror(os_error.errno)
        else:  # a name-resolution error carries its own text
            reason = os_error.strerror or str(os_error)
        raise DownloadError(
            f"downloading {shown} failed: could not connect to {error.host}:{error.port} "
            f"({reason})"
        ) from None
    except (aiohttp.ClientError, OSError) as error:
        _discard(dest)
        # never echo a password that was part of the URL
        reason = str(error).replace(url, shown) or type(error).__name__
        raise DownloadError(f"downloading {shown} failed: {reason}") from None
    except BaseException:  # cancelled: leave nothing half-written either
        _discard(dest)
        raise
    return size


def _discard(path: Path) -> None:
    """Remove a partial download, if there is one."""
    path.unlink(missing_ok=True)


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
        ArchiveError: unknown format, a corrupt or encrypted archive, or an unsafe
            member (absolute path, ``..``, a name given twice, a member inside a symbolic
            link, a link out of the tree, a hard link to anything but an earlier file, a
            device or fifo); ``dest`` is then removed, so nothing half-written is left.
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


@dataclass(frozen=True)
class _Member:
    """One archive member as the safety check sees it, whatever the format."""

    name: str  # as written in the archive, for messages
    kind: str  # "file", "dir", "symlink", "hardlink" or "special" (device, fifo...)
    link: str = ""  # the target of a link


#: Most symbolic links followed while resolving one link target (Linux's ELOOP limit).
_MAX_HOPS = 40


def _parts(name: str) -> list[str]:
    """Split a member name into its components, without empty ones and ``.``."""
    return [part for part in name.split("/") if part not in ("", ".")]


def _check_name(name: str) -> str | None:
    """Return why ``name`` is unsafe as a member path, or ``None`` if it is fine."""
    if "\x00" in name:
        return f"the member name {name!r} contains NUL"
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(parts[0]) == 2 and parts[0][1] == ":"):
        return f"{name!r} is an absolute path"
    if ".." in parts:
        return f"{name!r} contains '..'"
    return None


def _resolves_inside(folder: list[str], target: str, links: dict[str, str]) -> bool:
    """Tell whether the link ``target``, read in ``folder``, stays inside the tree.

    Resolution is lexical, over the archive's own links (the destination starts empty,
    so they are the only links there will be): no filesystem call, so no
    ``os.path.realpath`` that gives up on long paths (CVE-2025-4517).
    """
    if target.startswith("/"):
        return False
    resolved = list(folder)
    pending = target.split("/")
    pending.reverse()
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                return False
            resolved.pop()
            continue
        resolved.append(part)
        link = links.get("/".join(resolved))
        if link is not None:
            hops += 1
            if hops > _MAX_HOPS or link.startswith("/"):
                return False
            resolved.pop()
            pending.extend(reversed(link.split("/")))
    return True


def _check_members(members: list[_Member]) -> str | None:
    """Return why the archive is unsafe to unpack, or ``None`` if every member is safe.

    Refused: absolute names and ``..``; devices, fifos and other special files; a name
    given twice (unless both are folders), since the second would be written through
    the first; any member inside a symbolic link of the archive; symbolic links that
    resolve outside the tree; hard links to anything but an earlier regular file.
    """
    kinds: dict[str, str] = {}
    links: dict[str, str] = {}
    for member in members:
        problem = _check_name(member.name)
        if problem:
            return problem
        if member.kind == "special":
            return f"{member.name!r} is a device, a fifo or another special file"
        key = "/".join(_parts(member.name))
        if not key:
            if member.kind != "dir":
                return f"the member {member.name!r} has no name"
            continue
        seen = kinds.get(key)
        if seen is not None and not (seen == member.kind == "dir"):
            return f"{member.name!r} appears more than once"
        kinds[key] = member.kind
        if member.kind == "symlink":
            links[key] = member.link
        elif member.kind == "hardlink":
            target = "/".join(_parts(member.link))
            if _check_name(member.link) or kinds.get(target) != "file" or target == key:
                return (
                    f"hard link {member.name!r} points to {member.link!r}, which is not an "
                    "earlier file of the archive"
                )
    for member in members:
        parts = _parts(member.name)
        for end in range(1, len(parts)):
            if "/".join(parts[:end]) in links:
                return f"{member.name!r} is inside the symbolic link {'/'.join(parts[:end])!r}"
        if member.kind == "symlink" and not _resolves_inside(parts[:-1], member.link, links):
            return f"link {member.name!r} points outside the folder (to {member.link!r})"
    return None


def _tar_member(info: tarfile.TarInfo) -> _Member:
    if info.isreg():
        return _Member(info.name, "file")
    if info.isdir():
        return _Member(info.name, "dir")
    if info.issym():
        return _Member(info.name, "symlink", info.linkname)
    if info.islnk():
        return _Member(info.name, "hardlink", info.linkname)
    return _Member(info.name, "special")


def _corrupt(kind: str, error: BaseException) -> ArchiveError:
    """The error for an archive that cannot be read, or a disk that cannot be written."""
    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        return ArchiveError(f"the {kind} archive could not be unpacked: {error.strerror}")
    # tarfile lists every method it tried, one per line: the first line says enough
    lines = str(error).splitlines()
    reason = lines[0].rstrip(": ") if lines else type(error).__name__
    return ArchiveError(f"the {kind} archive is corrupt or truncated: {reason}")


#: What reading a broken archive raises, depending on the compression.
_READ_ERRORS = (
    tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error,
    lzma.LZMAError, NotImplementedError,
)


_TAR_MODES: dict[str, Literal["r:", "r:gz", "r:bz2", "r:xz"]] = {
    "tar": "r:", "tar.gz": "r:gz", "tar.bz2": "r:bz2", "tar.xz": "r:xz",
}


def _unpack_tar(archive: Path, dest: Path, kind: str) -> None:
    try:
        with tarfile.open(archive, _TAR_MODES[kind]) as tar:
            infos = tar.getmembers()
            problem = _check_members([_tar_member(info) for info in infos])
            if problem:
                raise ArchiveError(f"the {kind} archive is unsafe to unpack: {problem}")
            # the "data" filter is a second line of defence: it also refuses links
            # leaving the tree, devices and fifos, and drops setuid/setgid bits
            tar.extractall(dest, members=infos, filter="data")
            # tarfile stops at the end-of-archive blocks; reading on to the end of the
            # compressed stream checks its CRC, which catches corrupted file contents
            assert tar.fileobj is not None
            while tar.fileobj.read(_CHUNK):
                pass
    except tarfile.FilterError as error:
        raise ArchiveError(f"the {kind} archive is unsafe to unpack: {error}") from None
    except _READ_ERRORS as error:
        raise _corrupt(kind, error) from None


#: Longest symbolic link target read from a zip member.
_MAX_LINK = 4096
#: ``ZipInfo.create_system`` of an archive made on Unix, whose modes mean something.
_UNIX = 3
#: The general-purpose flag of an encrypted zip member.
_ENCRYPTED = 0x1


def _unix_mode(info: zipfile.ZipInfo) -> int:
    """The Unix mode a zip member was stored with, or 0 if it was made elsewhere."""
    return info.external_attr >> 16 if info.create_system == _UNIX else 0


def _zip_member(zip_file: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Member:
    mode = _unix_mode(info)
    if info.flag_bits & _ENCRYPTED:
        raise ArchiveError(
            f"the zip archive is encrypted: {info.filename!r} cannot be read without a password"
        )
    if info.is_dir():
        return _Member(info.filename, "dir")
    if stat.S_ISLNK(mode):
        if info.file_size > _MAX_LINK:
            raise ArchiveError(
                f"the zip archive is unsafe to unpack: link {info.filename!r} is too long"
            )
        return _Member(info.filename, "symlink", zip_file.read(info).decode("utf-8", "replace"))
    # many zip writers (Python's writestr among them) store permission bits only
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        return _Member(info.filename, "special")
    return _Member(info.filename, "file")


def _unpack_zip(archive: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zip_file:
            infos = zip_file.infolist()
            members = [_zip_member(zip_file, info) for info in infos]
            problem = _check_members(members)
            if problem:
                raise ArchiveError(f"the zip archive is unsafe to unpack: {problem}")
            for info, member in zip(infos, members, strict=True):
                _extract_zip_member(zip_file, info, member, dest)
    except _READ_ERRORS as error:
        raise _corrupt("zip", error) from None


def _extract_zip_member(
    zip_file: zipfile.ZipFile, info: zipfile.ZipInfo, member: _Member, dest: Path
) -> None:
    """Write one member already checked by :func:`_check_members`."""
    parts = _parts(member.name)
    if not parts:
        return
    target = os.path.join(dest, *parts)
    if member.kind == "dir":
        os.makedirs(target, exist_ok=True)
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if member.kind == "symlink":
        os.symlink(member.link, target)
        return
    # "x": never write through something already there
    with zip_file.open(info) as source, open(target, "xb") as out:
        shutil.copyfileobj(source, out, _CHUNK)
    # keep only the executable bits (scripts named in a Procfile need them)
    os.chmod(target, 0o755 if _unix_mode(info) & 0o111 else 0o644)
