"""Packing a folder into a ``.tar.gz`` to upload, as git would see it.

The folder's ``.gitignore`` files (and ``.smartmobignore`` files, read after them in each
folder, for what is in git but need not be deployed) say what to leave out, by the rules
of :mod:`smartmob_agent.client.ignore`; ``.git`` is always left out. The archive is
*reproducible*: members sorted by name, every time stamp set to 1980-01-01, owners
cleared, so the same files give the same bytes and the same checksum, and the agent
reuses what it has (a deploy of an unchanged folder changes nothing).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from smartmob_agent.client.ignore import Rule, ignored, parse

#: Files whose rules say what to leave out, read in this order in each folder.
IGNORE_FILES = (".gitignore", ".smartmobignore")
#: Always left out.
ALWAYS_IGNORED = frozenset({".git"})
#: The time stamp of every member (1980-01-01, the earliest a zip file can hold too).
MTIME = 315532800


def list_files(root: Path, *, ignore: bool = True) -> list[str]:
    """The paths (relative, ``/`` separators, sorted) that :func:`pack_folder` packs:
    files, symbolic links, and empty folders."""
    found: list[str] = []
    _walk(root, "", [], ignore, found)
    return sorted(found)


def _walk(root: Path, relative: str, rules: list[Rule], ignore: bool, found: list[str]
          ) -> None:
    folder = root / relative if relative else root
    if ignore:
        rules = rules + _rules_of(folder, relative)
    entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    kept = 0
    for entry in entries:
        path = f"{relative}/{entry.name}" if relative else entry.name
        is_folder = entry.is_dir(follow_symlinks=False)
        if entry.name in ALWAYS_IGNORED or (ignore and ignored(rules, path, is_folder)):
            continue
        kept += 1
        if is_folder:
            _walk(root, path, rules, ignore, found)
        else:
            found.append(path)
    if not kept and relative:
        found.append(relative + "/")  # an empty folder is kept, as the app may need it


def _rules_of(folder: Path, relative: str) -> list[Rule]:
    rules: list[Rule] = []
    for name in IGNORE_FILES:
        path = folder / name
        if path.is_file():
            rules += parse(path.read_text(encoding="utf-8", errors="replace"), relative)
    return rules


def pack_folder(
    root: Path, *, ignore: bool = True, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Pack ``root`` into a new ``.tar.gz`` file (the caller deletes it); return its path.

    Args:
        ignore: honour the ignore files (else pack everything but ``.git``).
        progress: called after each member with (members packed, members in all).

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    names = list_files(root, ignore=ignore)
    handle, name = tempfile.mkstemp(prefix="smartmob-", suffix=".tar.gz")
    os.close(handle)
    target = Path(name)
    try:
        with target.open("wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as packed, \
                tarfile.open(fileobj=packed, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for count, member in enumerate(names, 1):
                archive.add(root / member.rstrip("/"), arcname=member.rstrip("/"),
                            recursive=False, filter=_normalise)
                if progress is not None:
                    progress(count, len(names))
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Same files, same bytes: no owners, no time stamps, only the permission bits."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = MTIME
    info.mode &= 0o777
    info.pax_headers = {}
    return info


def sha256_of(path: Path) -> str:
    """The hexadecimal SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def measure(path: Path) -> tuple[int, str]:
    """A file's size and hexadecimal SHA-256."""
    return path.stat().st_size, sha256_of(path)
