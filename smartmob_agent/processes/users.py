"""Who the children run as (the user-database adapter): :option:`--user` and
:option:`--group` looked up once into a :class:`~smartmob_agent.model.RunAs`, and the
folders such a user gets or must be able to pass through.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smartmob_agent.errors import InvalidRequest
from smartmob_agent.model import RunAs


def resolve_run_as(user: str | None, group: str | None) -> RunAs | None:
    """The user (and group) the children run as, from :option:`--user` and
    :option:`--group`; ``None`` when they run as the agent does (no ``--user``, or one
    that names the agent's own user and group).

    A name is looked up first, then a number as a uid or gid; the user's groups (its
    supplementary groups, as ``initgroups`` finds them) are read once, here.

    Raises:
        InvalidRequest: an unknown user or group, or a user other than the agent's own
            while the agent does not run as root (only root can switch users).
    """
    if user is None:
        return None
    entry = _lookup(user, pwd.getpwnam, pwd.getpwuid)
    if entry is None:
        raise InvalidRequest(
            f"invalid configuration: --user: there is no user {user!r} on this machine",
            {"--user": "is not a known user"},
        )
    gid = entry.pw_gid
    if group is not None:
        group_entry = _lookup(group, grp.getgrnam, grp.getgrgid)
        if group_entry is None:
            raise InvalidRequest(
                f"invalid configuration: --group: there is no group {group!r} on this "
                "machine", {"--group": "is not a known group"},
            )
        gid = group_entry.gr_gid
    euid = os.geteuid()
    if entry.pw_uid == euid and gid == os.getegid():
        return None  # the agent's own user: nothing to switch
    if euid != 0:
        me = _user_name(euid)
        raise InvalidRequest(
            f"invalid configuration: --user {user}"
            + (f" --group {group}" if group is not None else "")
            + f": only root can run children as another user, and this agent runs as "
            f"{me} (uid {euid}): start it as root, or leave --user out",
            {"--user": "needs root"},
        )
    return RunAs(
        name=entry.pw_name, uid=entry.pw_uid, gid=gid,
        groups=tuple(sorted(set(os.getgrouplist(entry.pw_name, gid)))),
        home=entry.pw_dir,
    )


def _lookup(name: str, by_name: Callable[[str], Any], by_id: Callable[[int], Any]) -> Any:
    """The user or group database entry named ``name``, or numbered so; ``None``."""
    with contextlib.suppress(KeyError):
        return by_name(name)
    if name.isascii() and name.isdigit():
        with contextlib.suppress(KeyError, OverflowError):
            return by_id(int(name))
    return None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def give_tree(path: Path, run_as: RunAs) -> None:
    """Make ``path`` and everything under it belong to ``run_as`` (its uid and group).

    Never follows a symbolic link (the link itself changes owner), and walks the tree
    through folder descriptors, so a folder swapped for a link meanwhile cannot lead
    the walk elsewhere.
    """
    os.chown(path, run_as.uid, run_as.gid, follow_symlinks=False)
    for _, folders, files, fd in os.fwalk(path, follow_symlinks=False):
        for name in (*folders, *files):
            with contextlib.suppress(FileNotFoundError):
                os.chown(name, run_as.uid, run_as.gid, dir_fd=fd, follow_symlinks=False)


def blocked_folder(path: Path, run_as: RunAs) -> Path | None:
    """The first folder on the way to ``path`` (itself included) that ``run_as`` may not
    pass through (no search permission for it), or ``None``."""
    target = path.resolve()
    for folder in (*reversed(target.parents), target):
        info = os.stat(folder)
        if info.st_uid == run_as.uid:
            bit = stat.S_IXUSR
        elif info.st_gid == run_as.gid or info.st_gid in run_as.groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return folder
    return None
