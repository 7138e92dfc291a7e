"""Unpacking source archives (the filesystem adapter).

Knows nothing of processes, nor of where an archive came from (that is
:mod:`~smartmob_agent.sources.download`). :func:`detect_format` recognises zip and tar
(plain, gzip, bzip2, xz) by their first bytes, whatever the server claimed; :func:`unpack`
extracts into a fresh folder and refuses any member that could land outside it, and any
archive that passes the :class:`UnpackLimits` (checked while reading, so a bomb costs
little memory or time). Anything unsafe or too big raises
:class:`~smartmob_agent.errors.ArchiveRefused`, anything broken or cancelled
:class:`~smartmob_agent.errors.ArchiveError`, and leaves nothing behind.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import stat
import tarfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from smartmob_agent.errors import ArchiveError, ArchiveRefused
from smartmob_agent.sources.threads import run_cancellable

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

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
class UnpackLimits:
    """Bounds on one unpack, checked while the archive is read.

    Sizes are in bytes of unpacked content; path lengths are in characters of a member
    name (or link target) as written in the archive. The compression ratio is the bytes
    unpacked so far over the size of the archive file.
    """

    max_members: int = 50_000
    max_total_bytes: int = 2 * 1024**3
    max_member_bytes: int = 1024**3
    max_path_length: int = 1024
    #: most bytes unpacked per byte of archive, once past ``ratio_after`` bytes in all
    #: (a small archive of text or zeros compresses far better than this, harmlessly)
    max_ratio: float = 200.0
    ratio_after: int = 64 * 1024**2


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


def unpack(
    archive: Path,
    dest: Path,
    *,
    limits: UnpackLimits = UnpackLimits(),
    cancel: threading.Event | None = None,
) -> Path:
    """Extract ``archive`` into the new folder ``dest``; return the source root.

    The root is ``dest`` itself, or its only entry when the archive holds one top-level
    folder and nothing else (as GitHub's archives do). Blocking: run it in a thread, and
    set ``cancel`` to make it stop soon (between members, or between chunks read).

    Raises:
        ArchiveRefused: an unsafe member (absolute path, ``..``, a name given twice, a
            member inside a symbolic link, a link out of the tree, a hard link to
            anything but an earlier file, a device or fifo), or an archive over one of
            the ``limits`` (its compression ratio included);
        ArchiveError: unknown format, a corrupt or encrypted archive, a disk that cannot
            take it, or ``cancel`` set;
            either way ``dest`` is then removed, so nothing half-written is left.
    """
    with archive.open("rb") as file:
        kind = detect_format(file.read(512))
    dest.mkdir(parents=True)
    try:
        tally = _Tally(kind, limits, cancel, archive.stat().st_size)
        tally.check_cancel()
        if kind == "zip":
            _unpack_zip(archive, dest, tally)
        else:
            _unpack_tar(archive, dest, tally)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return source_root(dest)


async def unpack_in_thread(
    archive: Path, dest: Path, *, limits: UnpackLimits = UnpackLimits()
) -> Path:
    """:func:`unpack` in a thread; return the source root.

    When the caller is cancelled, the unpack is asked to stop (between two members, or
    two chunks read) and waited for, so it writes nothing more once this returns, in a
    folder the caller may be removing; ``dest`` is then gone.

    Raises:
        ArchiveError: as :func:`unpack`.
    """
    return await run_cancellable(
        lambda cancel: unpack(archive, dest, limits=limits, cancel=cancel)
    )


def source_root(folder: Path) -> Path:
    """Return ``folder``, or its single sub-folder if that is all it contains."""
    entries = list(folder.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return folder


#: Most bytes of headers (long names, PAX records, sparse maps) read for one tar member.
_MAX_HEADER = 256 * 1024
#: Header bytes allowed per member, on average, over a whole tar archive.
_HEADER_PER_MEMBER = 4 * 1024
#: Most bytes read after a tar's last member (end blocks and padding: 10 KiB, usually).
_MAX_TRAILING = 16 * 1024 * 1024


def _shown(name: str) -> str:
    """A member name for a message, cut short if it is long."""
    return repr(name if len(name) <= 80 else name[:60] + "...")


class _Tally:
    """The running checks of one unpack: the limits, as the archive is read, and cancel."""

    def __init__(
        self, kind: str, limits: UnpackLimits, cancel: threading.Event | None, size: int
    ) -> None:
        self.kind = kind
        self.limits = limits
        self.cancel = cancel
        self.size = size  # of the archive file, for the compression ratio
        self.members = 0
        self.total = 0
        self.header = 0  # header bytes read for the member being read
        self.headers = 0  # and for the whole archive
        self.max_headers = _MAX_HEADER + _HEADER_PER_MEMBER * limits.max_members

    def check_cancel(self) -> None:
        """Raise ArchiveError if unpacking was cancelled."""
        if self.cancel is not None and self.cancel.is_set():
            raise ArchiveError("unpacking was cancelled")

    def too_many(self) -> ArchiveRefused:
        """The error for an archive with more members than the limit."""
        return ArchiveRefused(
            f"the {self.kind} archive has more than {self.limits.max_members} members "
            "(the limit)"
        )

    def member(self, name: str, link: str = "") -> None:
        """Count one more member, refusing it past the member limit or with a long name."""
        self.check_cancel()
        self.header = 0
        self.members += 1
        limits = self.limits
        if self.members > limits.max_members:
            raise self.too_many()
        for what, path in (("member name", name), ("link target", link)):
            if len(path) > limits.max_path_length:
                raise ArchiveRefused(
                    f"the {self.kind} archive has a {what} longer than "
                    f"{limits.max_path_length} characters (the limit): {_shown(path)}"
                )

    def add(self, name: str, member_bytes: int, new_bytes: int) -> None:
        """Count ``new_bytes`` more of the member ``name``, now ``member_bytes`` long."""
        self.check_cancel()
        limits = self.limits
        if member_bytes > limits.max_member_bytes:
            raise ArchiveRefused(
                f"the {self.kind} archive has a member larger than "
                f"{limits.max_member_bytes} bytes (the limit): {_shown(name)}"
            )
        self.total += new_bytes
        if self.total > limits.max_total_bytes:
            raise ArchiveRefused(
                f"the {self.kind} archive unpacks to more than {limits.max_total_bytes} "
                "bytes (the limit)"
            )
        if self.total > limits.ratio_after and self.total > limits.max_ratio * self.size:
            raise ArchiveRefused(
                f"the {self.kind} archive unpacks to more than {limits.max_ratio:g} times "
                f"its size of {self.size} bytes (the compression ratio limit, checked past "
                f"{limits.ratio_after} bytes): a decompression bomb?"
            )

    def add_header(self, size: int) -> None:
        """Count ``size`` bytes of tar headers, refusing a member or archive past its share."""
        self.check_cancel()
        self.header += size
        self.headers += size
        if self.header > _MAX_HEADER:
            raise ArchiveRefused(
                f"the {self.kind} archive has a member header larger than {_MAX_HEADER} "
                "bytes (the limit)"
            )
        if self.headers > self.max_headers:
            raise ArchiveRefused(
                f"the {self.kind} archive has more than {self.max_headers} bytes of member "
                "headers (the limit)"
            )


class _CancellableFile(io.FileIO):
    """The archive file, read-only, that checks for cancellation before every read."""

    def __init__(self, path: Path, check: Callable[[], None]) -> None:
        super().__init__(path, "rb")
        self._check = check

    def read(self, size: int | None = -1, /) -> bytes:
        self._check()
        return super().read(size)

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        self._check()
        return super().readinto(buffer)


class _TarStream(io.BufferedIOBase):
    """The decompressed tar stream, as tarfile reads it.

    While ``scanning`` (reading headers only: tarfile seeks over member contents), every
    byte read is header, counted by :meth:`_Tally.add_header`: a long name or PAX record
    is refused before tarfile reads it into memory whole. Every read and seek checks for
    cancellation (as do the reads of the compressed file underneath, during long seeks).
    """

    def __init__(self, stream: io.BufferedIOBase, tally: _Tally) -> None:
        super().__init__()
        self._stream = stream
        self._tally = tally
        self.scanning = True

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1, /) -> bytes:
        if self.scanning:
            self._tally.add_header(_MAX_HEADER + 1 if size is None or size < 0 else size)
        else:  # extracting: tarfile copies contents 16 KiB at a time
            self._tally.check_cancel()
        return self._stream.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int:
        self._tally.check_cancel()
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()


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


def _decompressed(kind: str, raw: io.FileIO) -> io.BufferedIOBase:
    """The tar stream inside ``raw``, decompressed as it is read."""
    if kind == "tar.gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if kind == "tar.bz2":
        return bz2.BZ2File(raw)
    if kind == "tar.xz":
        return lzma.LZMAFile(raw)
    return io.BufferedReader(raw)


def _scan_tar(tar: tarfile.TarFile, tally: _Tally) -> list[tarfile.TarInfo]:
    """Read the members one at a time, refusing the archive as soon as it passes a limit.

    tarfile keeps only the members read so far, so memory stays within the member limit;
    declared sizes are exactly what extraction writes.
    """
    infos: list[tarfile.TarInfo] = []
    for info in tar:
        tally.member(info.name, info.linkname if info.issym() or info.islnk() else "")
        tally.add(info.name, info.size, info.size)
        infos.append(info)
    return infos


def _checked(infos: Iterable[tarfile.TarInfo], tally: _Tally) -> Iterator[tarfile.TarInfo]:
    """``infos``, stopping with ArchiveError before the next one once cancelled."""
    for info in infos:
        tally.check_cancel()
        yield info


def _unpack_tar(archive: Path, dest: Path, tally: _Tally) -> None:
    kind = tally.kind
    try:
        with (
            _CancellableFile(archive, tally.check_cancel) as raw,
            _decompressed(kind, raw) as stream,
        ):
            tar_stream = _TarStream(stream, tally)
            with tarfile.open(fileobj=tar_stream, mode="r:") as tar:
                infos = _scan_tar(tar, tally)
                tar_stream.scanning = False
                problem = _check_members([_tar_member(info) for info in infos])
                if problem:
                    raise ArchiveRefused(f"the {kind} archive is unsafe to unpack: {problem}")
                # the "data" filter is a second line of defence: it also refuses links
                # leaving the tree, devices and fifos, and drops setuid/setgid bits
                tar.extractall(dest, members=_checked(infos, tally), filter="data")
                # tarfile stops at the end-of-archive blocks; reading on to the end of the
                # compressed stream checks its CRC, which catches corrupted file contents
                _read_to_end(tar_stream, tally)
    except tarfile.FilterError as error:
        raise ArchiveRefused(f"the {kind} archive is unsafe to unpack: {error}") from None
    except _READ_ERRORS as error:
        raise _corrupt(kind, error) from None


def _read_to_end(stream: _TarStream, tally: _Tally) -> None:
    """Read what follows the last member (end blocks, padding), up to a limit."""
    rest = 0
    while chunk := stream.read(_CHUNK):
        rest += len(chunk)
        if rest > _MAX_TRAILING:
            raise ArchiveRefused(
                f"the {tally.kind} archive has more than {_MAX_TRAILING} bytes after its "
                "last member (the limit)"
            )


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
            raise ArchiveRefused(
                f"the zip archive is unsafe to unpack: link {info.filename!r} is too long"
            )
        return _Member(info.filename, "symlink", zip_file.read(info).decode("utf-8", "replace"))
    # many zip writers (Python's writestr among them) store permission bits only
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        return _Member(info.filename, "special")
    return _Member(info.filename, "file")


def _unpack_zip(archive: Path, dest: Path, tally: _Tally) -> None:
    try:
        with zipfile.ZipFile(archive) as zip_file:
            # the central directory is in memory already: refuse before writing anything
            infos = zip_file.infolist()
            if len(infos) > tally.limits.max_members:
                raise tally.too_many()
            members = []
            for info in infos:
                tally.member(info.filename)
                tally.add(info.filename, info.file_size, info.file_size)
                members.append(_zip_member(zip_file, info))
            problem = _check_members(members)
            if problem:
                raise ArchiveRefused(f"the zip archive is unsafe to unpack: {problem}")
            # declared sizes may lie and entries may share their data: count what is written
            written = _Tally("zip", tally.limits, tally.cancel, tally.size)
            for info, member in zip(infos, members, strict=True):
                written.check_cancel()
                _extract_zip_member(zip_file, info, member, dest, written)
    except _READ_ERRORS as error:
        raise _corrupt("zip", error) from None


def _extract_zip_member(
    zip_file: zipfile.ZipFile, info: zipfile.ZipInfo, member: _Member, dest: Path,
    written: _Tally,
) -> None:
    """Write one member already checked by :func:`_check_members`, counting its bytes."""
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
        size = 0
        while chunk := source.read(_CHUNK):
            size += len(chunk)
            written.add(member.name, size, len(chunk))
            out.write(chunk)
    # keep only the executable bits (scripts named in a Procfile need them)
    os.chmod(target, 0o755 if _unix_mode(info) & 0o111 else 0o644)
