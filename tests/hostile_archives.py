"""The hostile-archive corpus: source archives made to escape the work folder, exhaust the
machine, or confuse the agent, each with what the agent must answer.

:func:`corpus` builds them in memory (:mod:`tests.test_hostile_archives` serves each to a
real agent); run this module to write them to a folder, to try them on an agent by hand::

    python -m tests.hostile_archives /tmp/hostile /tmp/outside

The second folder is the one the escapes aim at (it must be an absolute path; it should
stay empty). Each archive's expected answer is printed beside its file name.

The limits a case needs are small ones where the real defaults would make the corpus big
or slow (an archive that inflates past 8 MiB rather than 2 GiB: same code path); the
member-count case uses the real default of 50,000 against 100,000 members, and the ratio
bomb the real 200:1 past 64 MiB.
"""

from __future__ import annotations

import bz2
import gzip
import io
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import tar_write_mode

PROCFILE = b"web: exec sleep 1000\n"
#: Enough ``..`` to reach ``/`` from any work folder, then down to the target.
CLIMB = "../" * 40


@dataclass(frozen=True)
class Hostile:
    """One archive of the corpus."""

    #: the file name it is served under (a kind that matches, or pretends to)
    filename: str
    data: bytes
    #: fragments the process's ``error`` must contain (any one of those split by ``|``);
    #: ``None``: the archive must be accepted (and the test checks what it unpacked to)
    error: str | None
    #: settings the case needs (small limits), as Settings fields
    settings: dict[str, Any] = field(default_factory=dict)
    #: for an accepted archive: relative paths (bytes: not UTF-8) and their contents
    files: dict[str | bytes, bytes] = field(default_factory=dict)
    #: the archive itself is safe and unpacks (to ``files``): what fails comes after
    unpacks: bool = False
    #: the ``reason`` of the failed process (see :class:`~smartmob_agent.model.FailureReason`)
    reason: str = "archive refused"


# -- building blocks ---------------------------------------------------------------------


def _info(name: str, kind: bytes = tarfile.REGTYPE, **attrs: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = attrs.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def tar(
    members: list[tuple[tarfile.TarInfo, bytes | None]], compression: str = "gz",
    encoding: str = "utf-8",
) -> bytes:
    """A tar archive of ``members`` in order (``compression``: "", gz, bz2 or xz)."""
    buffer = io.BytesIO()
    mode = tar_write_mode(f"tar.{compression}" if compression else "tar")
    with tarfile.open(fileobj=buffer, mode=mode, format=tarfile.GNU_FORMAT,
                      encoding=encoding) as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    return _info(name, mode=mode), data


def zip_archive(members: list[tuple[str, bytes, int]], deflate: bool = True) -> bytes:
    """A zip archive of (name, data, Unix mode) members, in order."""
    buffer = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            info.compress_type = method
            archive.writestr(info, data)
    return buffer.getvalue()


REG, LINK = 0o100644, 0o120777


def many_tiny_members(count: int) -> bytes:
    """A tar.gz of ``count`` empty files, headers patched from one template (fast: tarfile
    would take seconds to build 100,000 of them)."""
    template = bytearray(_info("f000000", mtime=0).tobuf(tarfile.USTAR_FORMAT))
    template[148:156] = b" " * 8
    base = sum(template) - sum(b"000000")
    blocks = []
    for index in range(count):
        digits = b"%06d" % index
        header = bytearray(template)
        header[1:7] = digits
        header[148:156] = b"%06o\0 " % (base + sum(digits))
        blocks.append(bytes(header))
    return gzip.compress(b"".join(blocks) + b"\0" * 1024, compresslevel=6)


def zeros_member_tar(size: int, compression: str) -> bytes:
    """A tar holding one member of ``size`` zeros, streamed (never ``size`` in memory)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=tar_write_mode(f"tar.{compression}")) as archive:
        archive.addfile(file("Procfile", PROCFILE)[0], io.BytesIO(PROCFILE))
        info = _info("zeros")
        info.size = size
        archive.addfile(info, _Zeros(size))
    return buffer.getvalue()


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = b"\0" * count
        self.left -= count
        return count


def overlapping_zip(copies: int, size: int) -> bytes:
    """A zip whose ``copies`` entries all point at one compressed member of ``size``
    zeros (David Fifield's overlap): tiny, but each entry unpacks whole."""
    one = zip_archive([("z0", b"\0" * size, REG)])
    local_end = one.index(b"PK\x01\x02")
    central = one[local_end:one.index(b"PK\x05\x06")]
    entries = []
    for index in range(copies):
        name = b"z%d" % index
        entry = bytearray(central[:46]) + name
        entry[28:30] = len(name).to_bytes(2, "little")  # name length; offset stays 0
        entries.append(bytes(entry))
    directory = b"".join(entries)
    end = (b"PK\x05\x06" + b"\0" * 4 + copies.to_bytes(2, "little") * 2
           + len(directory).to_bytes(4, "little") + local_end.to_bytes(4, "little") + b"\0\0")
    return one[:local_end] + directory + end


def half(data: bytes) -> bytes:
    """The first half of ``data``: a download cut short."""
    return data[: len(data) // 2]


# -- the corpus --------------------------------------------------------------------------


def builders(outside: Path) -> dict[str, Callable[[], Hostile]]:
    """How to build each hostile archive, by name, aimed at the absolute folder
    ``outside`` (built when called: some take a second)."""
    target = str(outside).lstrip("/")
    procfile = file("Procfile", PROCFILE)
    return {
        "zip-slip": lambda: Hostile(
            "app.zip",
            zip_archive([("Procfile", PROCFILE, REG), (f"{CLIMB}{target}/slip", b"x", REG)]),
            "the zip archive is unsafe to unpack: '"),
        "tar-slip": lambda: Hostile(
            "app.tar.gz", tar([procfile, file(f"{CLIMB}{target}/slip", b"x")]),
            "contains '..'"),
        "absolute-path-tar": lambda: Hostile(
            "app.tar.gz", tar([procfile, file(f"{outside}/abs", b"x")]),
            "is an absolute path"),
        "absolute-path-zip": lambda: Hostile(
            "app.zip",
            zip_archive([("Procfile", PROCFILE, REG), (f"{outside}/abs", b"x", REG)]),
            "is an absolute path"),
        "symlink-then-write-through": lambda: Hostile(
            "app.tar.gz",
            tar([procfile, (_info("escape", tarfile.SYMTYPE, linkname=str(outside)), None),
                 file("escape/through", b"x")]),
            "points outside|inside the symbolic link"),
        "relative-symlink-then-write-through-zip": lambda: Hostile(
            "app.zip",
            zip_archive([("Procfile", PROCFILE, REG),
                         ("up", f"{CLIMB}{target}".encode(), LINK),
                         ("up/through", b"x", REG)]),
            "points outside|inside the symbolic link"),
        "hard-link-to-etc-passwd": lambda: Hostile(
            "app.tar.gz",
            tar([procfile, (_info("passwd", tarfile.LNKTYPE, linkname="/etc/passwd"), None)]),
            "hard link 'passwd' points to '/etc/passwd'"),
        "hard-link-climbing-out": lambda: Hostile(
            "app.tar.gz",
            tar([procfile,
                 (_info("shadow", tarfile.LNKTYPE, linkname=f"{CLIMB}etc/shadow"), None)]),
            "hard link"),
        "character-device": lambda: Hostile(
            "app.tar.gz",
            tar([procfile, (_info("null", tarfile.CHRTYPE, devmajor=1, devminor=3), None)]),
            "is a device, a fifo or another special file"),
        "block-device": lambda: Hostile(
            "app.tar.gz",
            tar([procfile, (_info("sda", tarfile.BLKTYPE, devmajor=8, devminor=0), None)]),
            "is a device, a fifo or another special file"),
        "fifo": lambda: Hostile(
            "app.tar.gz", tar([procfile, (_info("pipe", tarfile.FIFOTYPE), None)]),
            "is a device, a fifo or another special file"),
        "inflates-past-the-total-limit": lambda: Hostile(
            "app.tar.gz", zeros_member_tar(20 << 20, "gz"),
            "unpacks to more than 8388608 bytes (the limit)",
            settings={"max_unpacked": 8 << 20}),
        "compression-ratio-bomb": lambda: Hostile(
            "app.tar.bz2", zeros_member_tar(100 << 20, "bz2"),
            "times its size|compression ratio limit"),
        "member-past-its-limit": lambda: Hostile(
            "app.zip",
            zip_archive([("Procfile", PROCFILE, REG), ("big", b"\0" * (3 << 20), REG)]),
            "has a member larger than 1048576 bytes (the limit): 'big'",
            settings={"max_member_size": 1 << 20}),
        "overlapping-zip-entries": lambda: Hostile(
            "app.zip", overlapping_zip(40, 1 << 20),
            "unpacks to more than 8388608 bytes (the limit)",
            settings={"max_unpacked": 8 << 20}),
        "100k-tiny-members": lambda: Hostile(
            "app.tar.gz", many_tiny_members(100_000),
            "has more than 50000 members (the limit)"),
        "path-too-long": lambda: Hostile(
            "app.tar.gz", tar([procfile, file("d/" * 600 + "x", b"x")]),
            "has a member name longer than 1024 characters (the limit)"),
        "truncated-tar-gz": lambda: Hostile(
            "app.tar.gz",
            half(tar([procfile, file("blob", bytes(range(256)) * 400)])),
            "is corrupt or truncated", reason="unpack failure"),
        "truncated-zip": lambda: Hostile(
            "app.zip",
            zip_archive([("Procfile", PROCFILE, REG)])[:-30],
            "is corrupt or truncated|not a zip or tar archive", reason="unpack failure"),
        "html-served-as-an-archive": lambda: Hostile(
            "app.tar.gz",
            b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Sign in</body>"
            b"</html>",
            "the source is not a zip or tar archive (it is an HTML page)",
            reason="unpack failure"),
        "zip-inside-a-tar": lambda: Hostile(
            "app.tar.gz",
            tar([(_info("app.zip"), ZIP_APP)]),
            "has no Procfile at its root (it holds only 'app.zip', a zip archive",
            files={"app.zip": ZIP_APP}, unpacks=True, reason="no procfile"),
        "bzip2-of-a-zip": lambda: Hostile(
            "app.tar.bz2",
            bz2.compress(zip_archive([("Procfile", PROCFILE, REG)])),
            "is corrupt or truncated", reason="unpack failure"),
        "unicode-names-tar": lambda: Hostile(
            "app.tar.gz",
            tar([procfile, *(file(name, data) for name, data in UNICODE.items())]),
            None, files={name: data for name, data in UNICODE.items()}),
        "unicode-names-zip": lambda: Hostile(
            "app.zip",
            zip_archive([("Procfile", PROCFILE, REG),
                         *((name, data, REG) for name, data in UNICODE.items())]),
            None, files={name: data for name, data in UNICODE.items()}),
        "latin-1-names": lambda: Hostile(
            "app.tar.gz",
            tar([procfile, file("café/naïve.txt", b"latin-1")], encoding="latin-1"),
            None, files={b"caf\xe9/na\xefve.txt": b"latin-1"}),
        "setuid-bits": lambda: Hostile(
            "app.tar.gz",
            tar([procfile, file("run", b"#!/bin/sh\n", mode=0o6755)]),
            None, files={"run": b"#!/bin/sh\n"}),
    }


def corpus(outside: Path) -> dict[str, Hostile]:
    """Every hostile archive, by name, aimed at the absolute folder ``outside``."""
    return {name: build() for name, build in builders(outside).items()}


#: A zip of an app, to put inside a tar.
ZIP_APP = zip_archive([("Procfile", PROCFILE, REG)])
#: Names of every sort that must unpack as they are.
UNICODE: dict[str, bytes] = {
    "données/café.txt": b"fr",
    "日本語/ファイル.txt": b"ja",
    "emoji 😀.txt": b"emoji",
    "עברית.txt": b"he",
    "new\nline.txt": b"nl",
    "back\\slash.txt": b"bs",
    "e\u0301.txt": b"nfd",  # decomposed é: not normalised
}


def main(argv: list[str]) -> int:
    """Write the corpus into ``argv[0]``, aimed at ``argv[1]``."""
    if len(argv) != 2 or not argv[1].startswith("/"):
        print("usage: python -m tests.hostile_archives OUTPUT_DIR /ABSOLUTE/TARGET_DIR",
              file=sys.stderr)
        return 2
    folder = Path(argv[0])
    folder.mkdir(parents=True, exist_ok=True)
    for name, case in corpus(Path(argv[1])).items():
        path = folder / f"{name}--{case.filename}"
        path.write_bytes(case.data)
        print(f"{path.name}: {f'{case.reason}: {case.error}' if case.error else 'accepted'}"
              + (f" (with {case.settings})" if case.settings else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
