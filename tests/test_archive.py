"""sources.download and sources.unpack: real downloads from 127.0.0.1, hostile archives."""

from __future__ import annotations

import asyncio
import bz2
import gzip
import io
import lzma
import os
import socket
import stat
import struct
import tarfile
import threading
import time
import tracemalloc
import warnings
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from smartmob_agent.errors import ArchiveError, DownloadError
from smartmob_agent.sources.download import DownloadLimits, display_url, download
from smartmob_agent.sources.unpack import UnpackLimits, detect_format, source_root, unpack
from tests.conftest import ArchiveServer
from tests.helpers import ARCHIVE_KINDS, eventually, make_archive, tar_write_mode

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

FILES: dict[str, str | bytes] = {
    "Procfile": "web: ./bin/run\n",
    "bin/run": "#!/bin/sh\necho hi\n",
    "data/notes.txt": "é€😀\n",
    "blob.bin": bytes(range(256)) * 40,
}


# -- a sandbox to see whatever an archive writes ------------------------------------------


@dataclass
class Sandbox:
    """A destination with an empty sibling folder, deep enough that '../..' stays in tmp."""

    root: Path
    archive: Path
    dest: Path
    outside: Path

    def write(self, data: bytes) -> Path:
        """Store ``data`` as the archive file and return its path."""
        self.archive.write_bytes(data)
        return self.archive

    def tree(self) -> set[str]:
        """Every path under the sandbox root, relative to it, links not followed."""
        found = set()
        for folder, dirs, files in os.walk(self.root):
            for name in dirs + files:
                found.add(os.path.relpath(os.path.join(folder, name), self.root))
        return found

    def assert_untouched(self) -> None:
        """Nothing was written outside the destination, and the destination is gone."""
        assert self.tree() == {"archive.bin", "up1", "up1/up2", "up1/up2/outside"}
        assert not os.path.lexists(self.dest)


@pytest.fixture
def box(tmp_path: Path) -> Sandbox:
    """A fresh sandbox in tmp_path."""
    outside = tmp_path / "up1" / "up2" / "outside"
    outside.mkdir(parents=True)
    return Sandbox(tmp_path, tmp_path / "archive.bin", outside.parent / "dest", outside)


# -- building hostile archives -----------------------------------------------------------

Entry = tuple[tarfile.TarInfo, bytes | None]


def reg(name: str, data: bytes = b"data", mode: int = 0o644) -> Entry:
    """A regular file member."""
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def folder(name: str) -> Entry:
    """A directory member."""
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info, None


def sym(name: str, target: str) -> Entry:
    """A symbolic link member."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


def hard(name: str, target: str) -> Entry:
    """A hard link member."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info, None


def special(name: str, kind: bytes) -> Entry:
    """A device or fifo member."""
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = kind, 1, 3
    return info, None


def build_tar(entries: list[Entry], kind: str = "tar") -> bytes:
    """A tar archive holding exactly ``entries``, in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=tar_write_mode(kind), format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


ZipEntry = tuple[str, bytes, int]
FILE, DIR, LINK = 0o100644, 0o040755, 0o120777


def build_zip(entries: list[ZipEntry]) -> bytes:
    """A zip archive holding exactly ``entries`` (name, data, mode), duplicates allowed."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": wanted here
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def escape_chain(kind: str) -> list[Entry]:
    """CVE-2025-4517: symlinks through long names so os.path.realpath gives up, then escape.

    Before Python 3.11.13 the tarfile "data" filter let this write a file outside the
    destination.
    """
    comp, steps, path = "d" * 247, "abcdefghijklmnop", ""
    entries: list[Entry] = []
    for step in steps:
        entries.append(folder(os.path.join(path, comp)))
        entries.append(sym(os.path.join(path, step), comp))
        path = os.path.join(path, comp)
    link = os.path.join(*steps, "l" * 254)
    entries.append(sym(link, "../" * len(steps)))
    entries.append(sym("escape", link + "/../outside"))
    entries.append(reg("escape/pwned", b"pwned"))
    return entries


# -- detect_format -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ARCHIVE_KINDS)
def test_detects_every_archive_kind(kind: str) -> None:
    """The first 512 bytes of each kind of archive name its format."""
    assert detect_format(make_archive(FILES, kind)[:512]) == kind


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        pytest.param(b"PK\x05\x06" + b"\x00" * 18, "zip", id="empty-zip"),
        pytest.param(gzip.compress(b"not a tar"), "tar.gz", id="any-gzip"),
        pytest.param(bz2.compress(b"x"), "tar.bz2", id="any-bzip2"),
        pytest.param(lzma.compress(b"x"), "tar.xz", id="any-xz"),
    ],
)
def test_detection_goes_by_magic_bytes(head: bytes, kind: str) -> None:
    """Detection trusts the magic bytes; what is inside is checked when unpacking."""
    assert detect_format(head) == kind


@pytest.mark.parametrize(
    ("head", "looks"),
    [
        pytest.param(b"<!DOCTYPE html><html>login</html>", "an HTML page", id="html-doctype"),
        pytest.param(b"\n  <html><body>", "an HTML page", id="html-indented"),
        pytest.param(b"<HEAD>", "an HTML page", id="html-head-uppercase"),
        pytest.param(b'{"error": "not found"}', "JSON", id="json-object"),
        pytest.param(b"  [1, 2]", "JSON", id="json-array"),
        pytest.param(b"", "empty", id="empty"),
        pytest.param(b"#!/bin/sh\necho", "something else", id="script"),
        pytest.param(b"PK\x01\x02", "something else", id="zip-central-header-only"),
        pytest.param(b"\x1f", "something else", id="half-gzip-magic"),
        pytest.param(b"x" * 600, "something else", id="text"),
    ],
)
def test_non_archives_are_named(head: bytes, looks: str) -> None:
    """Something that is not an archive raises ArchiveError saying what it looks like."""
    with pytest.raises(ArchiveError) as caught:
        detect_format(head)
    assert str(caught.value) == f"the source is not a zip or tar archive (it is {looks})"


# -- unpacking good archives -------------------------------------------------------------


@pytest.mark.parametrize("top", ["", "shop-1.0"])
@pytest.mark.parametrize("kind", ARCHIVE_KINDS)
def test_unpacks_every_kind(box: Sandbox, kind: str, top: str) -> None:
    """Each kind unpacks with its contents; a single top folder becomes the source root."""
    data = make_archive(FILES, kind, top=top, executable=frozenset({"bin/run"}))
    root = unpack(box.write(data), box.dest)
    assert root == (box.dest / top if top else box.dest)
    for name, content in FILES.items():
        expected = content.encode() if isinstance(content, str) else content
        assert (root / name).read_bytes() == expected
    assert os.stat(root / "bin/run").st_mode & 0o111 == 0o111
    assert os.stat(root / "Procfile").st_mode & 0o111 == 0
    assert not any(box.outside.iterdir())


@pytest.mark.parametrize(
    ("kind", "mode"), [("zip", 0o104755), ("tar", 0o4755), ("tar.gz", 0o6755)]
)
def test_setuid_bits_are_dropped(box: Sandbox, kind: str, mode: int) -> None:
    """setuid and setgid bits never survive unpacking, the executable bits do."""
    if kind == "zip":
        data = build_zip([("run", b"#!/bin/sh\n", mode)])
    else:
        data = build_tar([reg("run", b"#!/bin/sh\n", mode)], kind)
    root = unpack(box.write(data), box.dest)
    found = os.stat(root / "run").st_mode
    assert not found & (stat.S_ISUID | stat.S_ISGID)
    assert found & stat.S_IXUSR


@pytest.mark.parametrize("kind", ["tar", "tar.gz"])
def test_safe_links_inside_the_tree_are_kept(box: Sandbox, kind: str) -> None:
    """Links that stay inside the tree (like node_modules/.bin) are unpacked as links."""
    data = build_tar([
        folder("./"),
        reg("./lib/tool.py", b"print(1)"),
        folder("node_modules/.bin"),
        sym("node_modules/.bin/tool", "../../lib/tool.py"),
        sym("current", "lib"),
        sym("self", "."),
        hard("lib/copy.py", "lib/tool.py"),
        folder("lib"),  # a folder given twice is harmless
    ], kind)
    root = unpack(box.write(data), box.dest)
    assert root == box.dest
    assert os.readlink(root / "node_modules/.bin/tool") == "../../lib/tool.py"
    assert (root / "node_modules/.bin/tool").read_bytes() == b"print(1)"
    assert (root / "current/tool.py").read_bytes() == b"print(1)"
    assert (root / "lib/copy.py").read_bytes() == b"print(1)"
    assert os.stat(root / "lib/copy.py").st_ino == os.stat(root / "lib/tool.py").st_ino


def test_safe_zip_links_and_folders_are_kept(box: Sandbox) -> None:
    """A zip's folders, and its links that stay inside the tree, are unpacked."""
    data = build_zip([
        ("app/", b"", DIR),
        ("app/lib/tool.py", b"print(1)", FILE),
        ("app/bin/tool", b"../lib/tool.py", LINK),
        ("app/./x.txt", b"x", FILE),
    ])
    root = unpack(box.write(data), box.dest)
    assert root == box.dest / "app"
    assert os.readlink(root / "bin/tool") == "../lib/tool.py"
    assert (root / "bin/tool").read_bytes() == b"print(1)"
    assert (root / "x.txt").read_bytes() == b"x"


def test_zip_with_permission_bits_only_unpacks(box: Sandbox) -> None:
    """Zip members stored without a file type (as Python's writestr does) are plain files."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("Procfile", "web: x\n")  # external_attr is 0o600 << 16
        info = zipfile.ZipInfo("run")
        info.external_attr = 0o755 << 16
        archive.writestr(info, "#!/bin/sh\n")
    root = unpack(box.write(buffer.getvalue()), box.dest)
    assert (root / "Procfile").read_text() == "web: x\n"
    assert os.stat(root / "run").st_mode & 0o111 == 0o111
    assert os.stat(root / "Procfile").st_mode & 0o777 == 0o644


def test_zip_made_on_windows_ignores_the_mode_field(box: Sandbox) -> None:
    """A member made on another system is a plain file whatever its high attribute bits say."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("Procfile")
        info.create_system = 0  # MS-DOS
        info.external_attr = (0o120777 << 16) | 0x20  # would be a link on Unix
        archive.writestr(info, "web: x\n")
    root = unpack(box.write(buffer.getvalue()), box.dest)
    assert not (root / "Procfile").is_symlink()
    assert (root / "Procfile").read_text() == "web: x\n"


def test_encrypted_zip_is_refused(box: Sandbox) -> None:
    """A zip whose members need a password raises ArchiveError and leaves nothing."""
    data = bytearray(build_zip([("Procfile", b"web: x\n", FILE)]))
    data[6] |= 0x1  # the local header's "encrypted" flag
    data[data.find(b"PK\x01\x02") + 8] |= 0x1  # and the central directory's
    with pytest.raises(ArchiveError, match="encrypted: 'Procfile'"):
        unpack(box.write(bytes(data)), box.dest)
    box.assert_untouched()


def test_empty_zip_gives_empty_root(box: Sandbox) -> None:
    """A zip without members unpacks to an empty destination."""
    assert unpack(box.write(build_zip([])), box.dest) == box.dest
    assert list(box.dest.iterdir()) == []


def test_existing_destination_is_left_alone(box: Sandbox) -> None:
    """Unpacking into a folder that already exists fails and keeps what it holds."""
    box.dest.mkdir()
    (box.dest / "keep").write_text("mine")
    with pytest.raises(FileExistsError):
        unpack(box.write(make_archive(FILES, "tar.gz")), box.dest)
    assert (box.dest / "keep").read_text() == "mine"


def test_not_an_archive_creates_nothing(box: Sandbox) -> None:
    """A file that is no archive raises ArchiveError before the destination is created."""
    with pytest.raises(ArchiveError, match="an HTML page"):
        unpack(box.write(b"<!doctype html><p>Sign in</p>"), box.dest)
    box.assert_untouched()


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        pytest.param([], "", id="empty"),
        pytest.param(["d/"], "d", id="one-folder"),
        pytest.param(["d/", "f"], "", id="folder-and-file"),
        pytest.param(["f"], "", id="one-file"),
        pytest.param(["d/", "e/"], "", id="two-folders"),
        pytest.param(["d/", "l->d"], "", id="folder-and-link"),
        pytest.param(["l->/"], "", id="only-a-link-to-a-folder"),
    ],
)
def test_source_root(tmp_path: Path, entries: list[str], expected: str) -> None:
    """The root is the folder, or its only entry when that is a real folder."""
    for entry in entries:
        if "->" in entry:
            name, target = entry.split("->")
            os.symlink(target, tmp_path / name)
        elif entry.endswith("/"):
            (tmp_path / entry).mkdir()
        else:
            (tmp_path / entry).write_text("x")
    assert source_root(tmp_path) == (tmp_path / expected if expected else tmp_path)


# -- hostile archives --------------------------------------------------------------------

#: Long enough for escape_chain()'s 4000-character names, so the safety check is what
#: refuses it (the default path-length limit would refuse it first).
LONG_PATHS = UnpackLimits(max_path_length=10_000)

HOSTILE_TARS: dict[str, tuple[Callable[[Sandbox], list[Entry]], str]] = {
    "dotdot": (lambda box: [reg("../x")], "contains '..'"),
    "dotdot-into-sibling": (lambda box: [reg("../outside/x")], "contains '..'"),
    "dotdot-in-the-middle": (lambda box: [reg("a/../../x")], "contains '..'"),
    "absolute": (lambda box: [reg(f"{box.outside}/x")], "absolute path"),
    "absolute-tmp": (lambda box: [reg("/tmp/smartmob-absolute-x")], "absolute path"),
    "symlink-out-then-write": (
        lambda box: [sym("link", "../outside"), reg("link/x")], "points outside|inside the"),
    "symlink-absolute-then-write": (
        lambda box: [sym("link", str(box.outside)), reg("link/x")], "points outside|inside the"),
    "symlink-out-alone": (lambda box: [sym("link", "../outside")], "points outside"),
    "symlink-to-etc": (lambda box: [sym("etc", "/etc")], "points outside"),
    "symlink-then-file-of-same-name": (
        lambda box: [sym("x", "../outside/x"), reg("x")], "points outside|more than once"),
    "file-written-through-inner-link": (
        lambda box: [folder("d"), sym("in", "d"), reg("in/x")], "inside the symbolic link"),
    "symlink-chain-escape": (
        lambda box: [sym("d", "."), sym("e", "d/d/../../outside")], "points outside"),
    "symlink-via-other-link": (
        lambda box: [sym("up", ".."), sym("e", "up/outside")], "points outside"),
    "hardlink-to-etc-passwd": (lambda box: [hard("passwd", "/etc/passwd")], "hard link"),
    "hardlink-out": (lambda box: [hard("h", "../outside/secret")], "hard link"),
    "hardlink-through-symlink": (
        lambda box: [sym("s", "../outside/secret"), hard("h", "s")], "hard link|points outside"),
    "hardlink-to-later-file": (lambda box: [hard("h", "f"), reg("f")], "hard link"),
    "hardlink-to-itself": (lambda box: [hard("h", "h")], "hard link"),
    "character-device": (lambda box: [special("null", tarfile.CHRTYPE)], "device, a fifo"),
    "block-device": (lambda box: [special("disk", tarfile.BLKTYPE)], "device, a fifo"),
    "fifo": (lambda box: [special("pipe", tarfile.FIFOTYPE)], "device, a fifo"),
    "duplicate-file": (lambda box: [reg("a", b"1"), reg("a", b"2")], "more than once"),
    "duplicate-via-dot": (lambda box: [reg("a", b"1"), reg("./a", b"2")], "more than once"),
    "folder-then-link": (
        lambda box: [folder("a"), sym("a", "../outside")], "more than once"),
    "cve-2025-4517": (lambda box: escape_chain("tar"), "inside the symbolic link"),
}


@pytest.mark.parametrize("kind", ["tar", "tar.gz"])
@pytest.mark.parametrize("case", HOSTILE_TARS)
def test_hostile_tar_is_refused_and_writes_nothing(box: Sandbox, case: str, kind: str) -> None:
    """An unsafe tar raises ArchiveError, writes nothing outside and leaves no destination."""
    entries, reason = HOSTILE_TARS[case]
    archive = box.write(build_tar([reg("Procfile", b"web: x\n"), *entries(box)], kind))
    with pytest.raises(ArchiveError, match=rf"the {kind} archive is unsafe to unpack: ") as caught:
        unpack(archive, box.dest, limits=LONG_PATHS)
    assert any(part in str(caught.value) for part in reason.split("|")), caught.value
    box.assert_untouched()
    assert not os.path.lexists("/tmp/smartmob-absolute-x")


def zip_escape_chain() -> list[ZipEntry]:
    """The CVE-2025-4517 layout of escape_chain(), as zip members."""
    entries: list[ZipEntry] = []
    for info, data in escape_chain("zip"):
        if info.isdir():
            entries.append((info.name + "/", b"", DIR))
        elif info.issym():
            entries.append((info.name, info.linkname.encode(), LINK))
        else:
            entries.append((info.name, data or b"", FILE))
    return entries


HOSTILE_ZIPS: dict[str, tuple[Callable[[Sandbox], list[ZipEntry]], str]] = {
    "zip-slip": (lambda box: [("../../x", b"x", FILE)], "contains '..'"),
    "zip-slip-sibling": (lambda box: [("../outside/x", b"x", FILE)], "contains '..'"),
    "zip-slip-middle": (lambda box: [("a/../../../x", b"x", FILE)], "contains '..'"),
    "zip-slip-backslash": (lambda box: [("..\\..\\x", b"x", FILE)], "contains '..'"),
    "absolute": (lambda box: [(f"{box.outside}/x", b"x", FILE)], "absolute path"),
    "absolute-backslash": (lambda box: [("\\abs\\x", b"x", FILE)], "absolute path"),
    "drive-letter": (lambda box: [("C:/x", b"x", FILE)], "absolute path"),
    "symlink-out-then-write": (
        lambda box: [("link", b"../outside", LINK), ("link/x", b"x", FILE)],
        "points outside|inside the"),
    "symlink-absolute-then-write": (
        lambda box: [("link", str(box.outside).encode(), LINK), ("link/x", b"x", FILE)],
        "points outside|inside the"),
    "symlink-out-alone": (lambda box: [("link", b"../../..", LINK)], "points outside"),
    "symlink-then-file-of-same-name": (
        lambda box: [("x", b"../outside/x", LINK), ("x", b"data", FILE)],
        "points outside|more than once"),
    "file-then-symlink-of-same-name": (
        lambda box: [("x", b"data", FILE), ("x", b"../outside/x", LINK)],
        "points outside|more than once"),
    "symlink-chain-escape": (
        lambda box: [("d", b".", LINK), ("e", b"d/d/../../outside", LINK)], "points outside"),
    "write-through-inner-link": (
        lambda box: [("d/", b"", DIR), ("in", b"d", LINK), ("in/x", b"x", FILE)],
        "inside the symbolic link"),
    "duplicate-entries": (lambda box: [("a", b"1", FILE), ("a", b"2", FILE)], "more than once"),
    "folder-then-file": (lambda box: [("a/", b"", DIR), ("a", b"2", FILE)], "more than once"),
    "fifo": (lambda box: [("pipe", b"", 0o010644)], "device, a fifo"),
    "device": (lambda box: [("null", b"", 0o020644)], "device, a fifo"),
    "huge-link": (lambda box: [("link", b"a/" * 3000, LINK)], "too long"),
    "cve-2025-4517": (lambda box: zip_escape_chain(), "inside the symbolic link"),
}


@pytest.mark.parametrize("case", HOSTILE_ZIPS)
def test_hostile_zip_is_refused_and_writes_nothing(box: Sandbox, case: str) -> None:
    """An unsafe zip raises ArchiveError, writes nothing outside and leaves no destination."""
    entries, reason = HOSTILE_ZIPS[case]
    archive = box.write(build_zip([("Procfile", b"web: x\n", FILE), *entries(box)]))
    with pytest.raises(ArchiveError, match="the zip archive is unsafe to unpack: ") as caught:
        unpack(archive, box.dest, limits=LONG_PATHS)
    assert any(part in str(caught.value) for part in reason.split("|")), caught.value
    box.assert_untouched()


def corruptions() -> Iterator[object]:
    """Broken archives of every kind: truncated, bytes flipped, compressed non-tar."""
    payload: dict[str, str | bytes] = {
        "Procfile": "web: x\n", "blob": os.urandom(100_000), "text": "hello " * 5000,
    }
    for kind in ARCHIVE_KINDS:
        data = make_archive(payload, kind)
        yield pytest.param(kind, data[: len(data) // 2], id=f"{kind}-truncated-half")
        yield pytest.param(kind, data[:600], id=f"{kind}-truncated-600")
        if kind != "tar":  # plain tar has no checksum over file contents
            middle = len(data) // 2
            flipped = data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64])
            yield pytest.param(kind, flipped + data[middle + 64:], id=f"{kind}-flipped")
        if kind not in ("zip", "tar"):  # the gzip trailer, a checksum, is what is cut
            yield pytest.param(kind, data[:-8], id=f"{kind}-truncated-end")
    yield pytest.param("tar.gz", gzip.compress(b"not a tar " * 100), id="gzip-of-text")
    yield pytest.param("tar.bz2", bz2.compress(b"not a tar " * 100), id="bzip2-of-text")
    yield pytest.param("tar.xz", lzma.compress(b"not a tar " * 100), id="xz-of-text")
    yield pytest.param("zip", b"PK\x03\x04" + b"\x00" * 100, id="zip-header-only")


@pytest.mark.parametrize(("kind", "data"), list(corruptions()))
def test_corrupt_archives_are_refused_and_leave_nothing(
    box: Sandbox, kind: str, data: bytes
) -> None:
    """A truncated or damaged archive raises ArchiveError and its destination is removed."""
    with pytest.raises(ArchiveError, match=rf"the {kind} archive is corrupt or truncated: "):
        unpack(box.write(data), box.dest)
    box.assert_untouched()


def test_corruption_message_is_one_line(box: Sandbox) -> None:
    """tarfile's multi-line list of tried methods is cut to one line a person can read."""
    with pytest.raises(ArchiveError) as caught:
        unpack(box.write(bz2.compress(b"x" * 1000)), box.dest)
    assert "\n" not in str(caught.value)


# -- limits and cancellation -------------------------------------------------------------


def assert_refused(
    box: Sandbox, data: bytes, message: str, *, limits: UnpackLimits | None = None,
    cancel: threading.Event | None = None,
) -> None:
    """Unpacking ``data`` raises ArchiveError with exactly ``message`` and leaves nothing."""
    with pytest.raises(ArchiveError) as caught:
        unpack(box.write(data), box.dest, limits=limits or UnpackLimits(), cancel=cancel)
    assert str(caught.value) == message
    box.assert_untouched()


def numbered(count: int, size: int = 1) -> dict[str, str | bytes]:
    """``count`` files of ``size`` bytes each."""
    return {f"f{index:03}": b"x" * size for index in range(count)}


@pytest.mark.parametrize("kind", ARCHIVE_KINDS)
def test_too_many_members_are_refused(box: Sandbox, kind: str) -> None:
    """An archive with more members than max_members is refused, naming the limit."""
    assert_refused(
        box, make_archive(numbered(11), kind),
        f"the {kind} archive has more than 10 members (the limit)",
        limits=UnpackLimits(max_members=10),
    )


@pytest.mark.parametrize("kind", ARCHIVE_KINDS)
def test_total_size_over_the_limit_is_refused(box: Sandbox, kind: str) -> None:
    """Members that together pass max_total_bytes are refused, naming the limit."""
    assert_refused(
        box, make_archive(numbered(3, 400), kind),
        f"the {kind} archive unpacks to more than 1000 bytes (the limit)",
        limits=UnpackLimits(max_total_bytes=1000),
    )


@pytest.mark.parametrize("kind", ARCHIVE_KINDS)
def test_member_over_the_limit_is_refused(box: Sandbox, kind: str) -> None:
    """One member larger than max_member_bytes is refused, naming it and the limit."""
    assert_refused(
        box, make_archive({"small": "x", "big": b"\0" * 1001}, kind),
        f"the {kind} archive has a member larger than 1000 bytes (the limit): 'big'",
        limits=UnpackLimits(max_member_bytes=1000),
    )


@pytest.mark.parametrize("kind", ARCHIVE_KINDS)
def test_path_over_the_limit_is_refused(box: Sandbox, kind: str) -> None:
    """A member name longer than max_path_length is refused, naming the limit."""
    assert_refused(
        box, make_archive({"short": "x", "d/" + "n" * 19: "x"}, kind),
        f"the {kind} archive has a member name longer than 20 characters (the limit): "
        f"'d/{'n' * 19}'",
        limits=UnpackLimits(max_path_length=20),
    )


def test_link_target_over_the_limit_is_refused(box: Sandbox) -> None:
    """A tar link whose target is longer than max_path_length is refused."""
    assert_refused(
        box, build_tar([reg("a"), sym("link", "./" * 10 + "a")], "tar.gz"),
        "the tar.gz archive has a link target longer than 20 characters (the limit): "
        f"'{'./' * 10}a'",
        limits=UnpackLimits(max_path_length=20),
    )


@pytest.mark.parametrize("kind", ARCHIVE_KINDS)
def test_archive_at_exactly_the_limits_unpacks(box: Sandbox, kind: str) -> None:
    """Every limit is inclusive: an archive right at all of them unpacks."""
    files = numbered(4, 250)
    files["p" * 20] = b""
    limits = UnpackLimits(
        max_members=5, max_total_bytes=1000, max_member_bytes=250, max_path_length=20
    )
    root = unpack(box.write(make_archive(files, kind)), box.dest, limits=limits)
    assert sorted(path.name for path in root.iterdir()) == sorted(files)


def test_zip_entry_lying_about_its_size_is_refused(box: Sandbox) -> None:
    """A zip entry declaring fewer bytes than it holds is cut at the declared size and refused."""
    data = bytearray(build_zip([("big", b"\0" * 100_000, FILE)]))
    central = data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 500)  # uncompressed size, central directory
    struct.pack_into("<I", data, 22, 500)  # and local header
    assert_refused(
        box, bytes(data), "the zip archive is corrupt or truncated: Bad CRC-32 for file 'big'",
        limits=UnpackLimits(max_member_bytes=1000, max_total_bytes=1000),
    )


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        pytest.param(
            UnpackLimits(max_member_bytes=1000),
            "the zip archive has a member larger than 1000 bytes (the limit): 'a'",
            id="member",
        ),
        pytest.param(
            UnpackLimits(max_total_bytes=1000),
            "the zip archive unpacks to more than 1000 bytes (the limit)",
            id="total",
        ),
    ],
)
def test_zip_is_stopped_by_the_bytes_actually_written(
    box: Sandbox, monkeypatch: pytest.MonkeyPatch, limits: UnpackLimits, message: str
) -> None:
    """Entries that yield more bytes than declared are stopped by the count of bytes written."""
    data = build_zip([("a", b"1", FILE), ("b", b"2", FILE)])
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *_, **__: io.BytesIO(b"x" * 600_000))
    assert_refused(box, data, message, limits=limits)


@pytest.mark.parametrize("kind", ARCHIVE_KINDS)
def test_cancel_set_before_the_call_unpacks_nothing(box: Sandbox, kind: str) -> None:
    """An already cancelled unpack raises ArchiveError and leaves no destination."""
    cancel = threading.Event()
    cancel.set()
    assert_refused(box, make_archive(FILES, kind), "unpacking was cancelled", cancel=cancel)


class CancelAfter(threading.Event):
    """An event that reads as set from its ``calls``-th is_set() on: a cancel mid-way."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls

    def is_set(self) -> bool:
        """Count the call; report set once the count is reached."""
        self.calls -= 1
        return self.calls <= 0


@pytest.mark.parametrize("kind", ARCHIVE_KINDS)
def test_cancel_during_a_large_member_stops_it(box: Sandbox, kind: str) -> None:
    """Cancelling in the middle of an 8 MB member stops the unpack and removes it all."""
    data = make_archive({"Procfile": "web: x\n", "big": b"\0" * 8_000_000}, kind)
    cancel = CancelAfter(60)
    assert_refused(box, data, "unpacking was cancelled", cancel=cancel)
    assert cancel.calls == 0  # checked often enough to stop within a few chunks


def test_many_tiny_members_are_refused_in_bounded_memory(box: Sandbox) -> None:
    """A tar.xz of 200,000 directory entries is refused at the member limit, fast and small."""
    info = tarfile.TarInfo("d")
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    data = lzma.compress(info.tobuf(tarfile.USTAR_FORMAT) * 200_000 + b"\0" * 1024, preset=0)
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(ArchiveError, match=r"more than 1000 members \(the limit\)"):
            unpack(box.write(data), box.dest, limits=UnpackLimits(max_members=1000))
        elapsed = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 5
    assert peak < 20_000_000
    box.assert_untouched()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_huge_member_header_is_refused_before_it_is_read(box: Sandbox, fmt: int) -> None:
    """A 20 MB PAX record or GNU long name is refused before tarfile reads it into memory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz", format=fmt) as tar:
        info = tarfile.TarInfo("n" * 20_000_000 if fmt == tarfile.GNU_FORMAT else "x")
        info.pax_headers = {"comment": "c" * 20_000_000} if fmt == tarfile.PAX_FORMAT else {}
        tar.addfile(info, io.BytesIO(b""))
    data = buffer.getvalue()
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveError, match=r"has a member header larger than 262144 bytes"):
            unpack(box.write(data), box.dest)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000
    box.assert_untouched()


def test_headers_of_the_whole_archive_are_bounded(box: Sandbox) -> None:
    """PAX records each under the per-member bound still count towards a total for the archive."""
    entries = []
    for index in range(20):
        info, data = reg(f"f{index}", b"x")
        info.pax_headers = {"comment": "c" * 20_000}
        entries.append((info, data))
    assert_refused(
        box, build_tar(entries, "tar.gz"),
        "the tar.gz archive has more than 344064 bytes of member headers (the limit)",
        limits=UnpackLimits(max_members=20),
    )

def test_data_after_the_last_member_is_bounded(box: Sandbox) -> None:
    """Megabytes of zeros after a tar's end blocks are refused, not read on forever."""
    tar = build_tar([reg("Procfile", b"web: x\n")])
    data = gzip.compress(tar + b"\0" * 17 * 1024 * 1024, compresslevel=1)
    assert_refused(
        box, data, "the tar.gz archive has more than 16777216 bytes after its last member "
        "(the limit)",
    )


#: A ratio limit of 10:1 that applies past 100,000 bytes: small numbers, same rule.
RATIO = UnpackLimits(max_ratio=10, ratio_after=100_000)
#: The compressed kinds (make_archive stores zip members; plain tar does not compress).
COMPRESSED = ["zip", "tar.gz", "tar.bz2", "tar.xz"]


def compressed(files: dict[str, bytes], kind: str) -> bytes:
    """An archive of ``files`` that compresses them, whatever the kind."""
    if kind != "zip":
        return make_archive(dict(files), kind)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", COMPRESSED)
def test_compression_ratio_over_the_limit_is_refused(box: Sandbox, kind: str) -> None:
    """An archive unpacking to more than max_ratio times its size, once past
    ratio_after bytes, is refused, naming the ratio and the archive's size."""
    data = compressed({"Procfile": b"web: x\n", "zeros": b"\0" * 300_000}, kind)
    assert len(data) * 10 < 300_000
    assert_refused(
        box, data,
        f"the {kind} archive unpacks to more than 10 times its size of {len(data)} bytes "
        "(the compression ratio limit, checked past 100000 bytes): a decompression bomb?",
        limits=RATIO,
    )


@pytest.mark.parametrize("kind", COMPRESSED)
def test_compression_ratio_is_not_applied_to_small_archives(box: Sandbox, kind: str) -> None:
    """Below ratio_after, any ratio passes: small archives of text compress well."""
    data = compressed({"Procfile": b"web: x\n", "zeros": b"\0" * 90_000}, kind)
    assert len(data) * 10 < 90_000
    root = unpack(box.write(data), box.dest, limits=RATIO)
    assert (root / "zeros").stat().st_size == 90_000


def test_a_ratio_bomb_is_stopped_before_it_is_written(box: Sandbox) -> None:
    """A tar.bz2 of 100 MB of zeros (a few hundred bytes) is refused at the default ratio,
    past 64 MiB, from its headers: quickly, writing nothing."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:bz2") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = 100_000_000
        tar.addfile(info, ZeroFile(info.size))
    data = buffer.getvalue()
    start = time.monotonic()
    with pytest.raises(ArchiveError, match=r"more than 200 times its size .* bomb"):
        unpack(box.write(data), box.dest)
    assert time.monotonic() - start < 5
    box.assert_untouched()


class ZeroFile(io.RawIOBase):
    """``size`` zero bytes, read without holding them."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        view = memoryview(buffer).cast("B")
        count = min(len(view), self.left)
        view[:count] = b"\0" * count
        self.left -= count
        return count


def test_zip_ratio_is_counted_on_the_bytes_actually_written(
    box: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Zip entries that declare a few bytes but yield many pass the declared check and are
    stopped by the ratio of what is written."""
    data = build_zip([("a", b"1", FILE), ("b", b"2", FILE)])
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *_, **__: io.BytesIO(b"x" * 600_000))
    with pytest.raises(ArchiveError, match="the compression ratio limit"):
        unpack(box.write(data), box.dest, limits=RATIO)
    box.assert_untouched()


# -- odd names ---------------------------------------------------------------------------


def test_tar_names_with_bytes_that_are_not_utf8_are_kept_as_bytes(box: Sandbox) -> None:
    """A Latin-1 name (not UTF-8) unpacks to a file of exactly those bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.GNU_FORMAT,
                      encoding="latin-1") as tar:
        for info, data in [reg("Procfile", b"web: x\n"), reg("café/naïve.txt", b"latin")]:
            tar.addfile(info, io.BytesIO(data or b""))
    root = unpack(box.write(buffer.getvalue()), box.dest)
    folder = os.path.join(os.fsencode(root), b"caf\xe9")
    assert os.listdir(folder) == [b"na\xefve.txt"]
    with open(os.path.join(folder, b"na\xefve.txt"), "rb") as file:
        assert file.read() == b"latin"


def test_zip_names_in_cp437_are_decoded(box: Sandbox) -> None:
    """A zip name without the UTF-8 flag is CP437, as the format says: 0x82 is é."""
    data = bytearray(build_zip([("Procfile", b"web: x\n", FILE), ("cafe.txt", b"x", FILE)]))
    for offset in range(len(data) - 8):
        if data[offset:offset + 8] == b"cafe.txt":
            data[offset + 3] = 0x82
    root = unpack(box.write(bytes(data)), box.dest)
    assert (root / "café.txt").read_bytes() == b"x"


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_names_with_control_characters_and_unicode_unpack(box: Sandbox, kind: str) -> None:
    """Newlines, escapes, a backslash (a plain character on Unix), emoji and
    non-Latin scripts are all just names."""
    files: dict[str, str | bytes] = {
        "Procfile": "web: x\n", "new\nline.txt": "1", "esc\x1b[31m.txt": "2",
        "back\\slash.txt": "3", "日本語/ファイル.txt": "4", "emoji 😀.txt": "5",
        "ΑΒΓ/דוגמה.txt": "6", "trailing space ": "7",
    }
    root = unpack(box.write(make_archive(files, kind)), box.dest)
    for name, content in files.items():
        assert (root / name).read_text() == content


def test_an_odd_name_in_a_refusal_stays_on_one_line(box: Sandbox) -> None:
    """The error quotes a hostile name with its escapes: no raw newline or escape."""
    data = build_tar([reg("../\n\x1b[2Jpwned")])
    with pytest.raises(ArchiveError) as caught:
        unpack(box.write(data), box.dest)
    assert "\n" not in str(caught.value)
    assert "\x1b" not in str(caught.value)
    box.assert_untouched()


# -- download ----------------------------------------------------------------------------


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session, closed after the test."""
    async with aiohttp.ClientSession() as session:
        yield session


async def test_download_streams_the_body_to_the_file(
    archive_server: ArchiveServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A 200 answer is written to the file whole, and its size returned."""
    data = make_archive(FILES, "tar.gz") + os.urandom(300_000)
    url = archive_server.add("app.tar.gz", data)
    dest = tmp_path / "source.part"
    assert await download(session, url, dest, headers={"X-Request-Id": "req-1"}) == len(data)
    assert dest.read_bytes() == data
    assert archive_server.hits("app.tar.gz") == 1
    assert archive_server.requests[-1].headers["X-Request-Id"] == "req-1"


async def test_downloaded_archive_unpacks(
    archive_server: ArchiveServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """An archive fetched from the server unpacks to its files."""
    url = archive_server.add("app.zip", make_archive(FILES, "zip", top="app"))
    await download(session, url, tmp_path / "part")
    root = unpack(tmp_path / "part", tmp_path / "source")
    assert (root / "Procfile").read_text() == "web: ./bin/run\n"


async def test_download_at_exactly_the_limit_passes(
    archive_server: ArchiveServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A body exactly max_bytes long is accepted."""
    url = archive_server.add("exact", b"x" * 1000)
    limits = DownloadLimits(max_bytes=1000)
    assert await download(session, url, tmp_path / "part", limits=limits) == 1000


def assert_no_file(path: Path) -> None:
    """Nothing, not even a dangling link, is at ``path``."""
    assert not os.path.lexists(path)


async def assert_download_fails(
    session: aiohttp.ClientSession, url: str, dest: Path, *fragments: str,
    limits: DownloadLimits | None = None,
) -> str:
    """Download must raise DownloadError containing ``fragments`` and leave no file."""
    with pytest.raises(DownloadError) as caught:
        await download(session, url, dest, limits=limits or DownloadLimits())
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message
    assert_no_file(dest)
    return message


async def test_download_404_fails_and_removes_the_file(
    archive_server: ArchiveServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A 404 raises DownloadError naming the status, and a previous file is removed."""
    dest = tmp_path / "part"
    dest.write_bytes(b"stale")
    url = archive_server.url("missing.tar.gz")
    await assert_download_fails(session, url, dest, "404", url)


async def test_download_over_the_declared_size_fails(
    archive_server: ArchiveServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A Content-Length over max_bytes fails before any byte is written."""
    url = archive_server.add("big", b"x" * 1001)
    await assert_download_fails(
        session, url, tmp_path / "part", "1001 bytes", "limit of 1000",
        limits=DownloadLimits(max_bytes=1000),
    )


async def test_download_over_the_size_without_length_fails(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    session: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    """A chunked body without Content-Length is cut off once it passes max_bytes."""
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(50):
            await response.write(b"y" * 100)
        return response

    app = web.Application()
    app.router.add_get("/endless", endless)
    server = await aiohttp_server(app, host="127.0.0.1")
    await assert_download_fails(
        session, str(server.make_url("/endless")), tmp_path / "part",
        "over the limit of 1000 bytes", limits=DownloadLimits(max_bytes=1000),
    )


async def test_download_connection_refused(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A port nobody listens on gives a DownloadError naming host and port."""
    port = free_port()
    await assert_download_fails(
        session, f"http://127.0.0.1:{port}/a.tgz", tmp_path / "part",
        f"could not connect to 127.0.0.1:{port} (Connection refused)",
    )


async def test_download_stall_fails(
    archive_server: ArchiveServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A server that stops sending mid-body fails after the stall time, leaving no file."""
    await assert_download_fails(
        session, archive_server.url("stall"), tmp_path / "part", "no data for 0.3 s",
        limits=DownloadLimits(stall=0.3),
    )


async def test_cancelled_download_leaves_no_file(
    archive_server: ArchiveServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Cancelling a download midway removes the partial file."""
    dest = tmp_path / "part"
    task = asyncio.ensure_future(download(session, archive_server.url("stall"), dest))
    await eventually(dest.exists, timeout=10, what="the partial file appearing")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not dest.exists()


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://127.0.0.1:99999/a.tgz", id="port-out-of-range"),
        pytest.param("http://user:hunter2@127.0.0.1:99999/a.tgz", id="with-password"),
        pytest.param("http:///a.tgz", id="no-host"),
    ],
)
async def test_download_invalid_url(
    session: aiohttp.ClientSession, tmp_path: Path, url: str
) -> None:
    """A URL that cannot be fetched gives a DownloadError, never an unexpected exception."""
    message = await assert_download_fails(session, url, tmp_path / "part", "not valid")
    assert "hunter2" not in message


async def test_download_error_hides_the_password(
    archive_server: ArchiveServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Credentials in the source URL never appear in error messages."""
    url = archive_server.url("missing").replace("http://", "http://user:hunter2@")
    message = await assert_download_fails(session, url, tmp_path / "part", "404")
    assert "hunter2" not in message
    assert "user" not in message


async def test_html_login_page_is_refused_after_download(
    archive_server: ArchiveServer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A server answering with an HTML page gives an ArchiveError that says so."""
    await download(session, archive_server.url("page.html"), tmp_path / "part")
    with pytest.raises(ArchiveError, match="it is an HTML page"):
        unpack(tmp_path / "part", tmp_path / "source")
    assert not (tmp_path / "source").exists()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param("http://u:p@127.0.0.1/a.tgz", "http://127.0.0.1/a.tgz", id="user-password"),
        pytest.param("http://u@127.0.0.1/a.tgz", "http://127.0.0.1/a.tgz", id="user"),
        pytest.param("https://127.0.0.1:8443/a?x=1", "https://127.0.0.1:8443/a?x=1",
                     id="plain"),
        pytest.param("http://[::1/x", "the source URL", id="unparsable"),
    ],
)
def test_display_url_hides_credentials(url: str, shown: str) -> None:
    """URLs in messages never carry a user name or password."""
    assert display_url(url) == shown
