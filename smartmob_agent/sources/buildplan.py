"""The build step and release phase of a source, the pure parts: what to do, under which
key, with which commands and environment (see :ref:`lifecycle-build`).

Like Heroku's Python buildpack: a source with a ``requirements.txt`` at its root gets a
virtual environment of its own, with the requirements installed, before its processes
start; a Procfile with a ``release`` entry has that command run once per new source
first. The adapter that runs them is :mod:`smartmob_agent.sources.builds`; nothing here touches
a file or a process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from smartmob_agent.errors import UnknownProcessType
from smartmob_agent.sources.procfile import ProcfileEntry

#: The file whose presence at the root of a source asks for a virtual environment.
REQUIREMENTS = "requirements.txt"
#: The Procfile entry run once per new source, before its processes (Heroku's name).
RELEASE = "release"
#: Part of every build key: bumped when the layout of a build folder changes, so that an
#: agent never reuses a build made the old way.
BUILD_FORMAT = 1
#: Lines of output quoted in the ``error`` of a failed build or release.
TAIL_LINES = 10
#: Variables that break a virtual environment's interpreter, dropped where one is used
#: (the ``activate`` script of :mod:`venv` unsets it too).
_BREAKS_VENV = ("PYTHONHOME",)


def build_key(archive_sha256: str, interpreter: str, version: str) -> str:
    """The name of the build of a source: the same archive built by the same interpreter
    is the same build, shared by every process of it.

    The archive's digest, not its URL: a URL may serve a new version (and two URLs the
    same one). The interpreter's path and version: a virtual environment is bound to the
    interpreter that made it, and compiled packages to its version.

    >>> key = build_key("ab" * 32, "/usr/bin/python3.11", "3.11.7")
    >>> len(key), key == build_key("ab" * 32, "/usr/bin/python3.12", "3.12.1")
    (32, False)
    """
    text = "\0".join((str(BUILD_FORMAT), archive_sha256, interpreter, version))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Plan:
    """What a source needs before its processes start."""

    #: it has a ``requirements.txt``: a virtual environment is made for it
    requirements: bool
    #: its Procfile's ``release`` entry, if it has one
    release: ProcfileEntry | None

    @property
    def needed(self) -> bool:
        """Whether there is anything to build or release at all."""
        return self.requirements or self.release is not None


def plan(has_requirements: bool, entries: Mapping[str, ProcfileEntry]) -> Plan:
    """What to do for a source, given whether it has a ``requirements.txt`` and its
    Procfile's entries.

    >>> plan(False, {"web": ProcfileEntry("serve", {})}).needed
    False
    >>> plan(False, {"release": ProcfileEntry("migrate", {})}).release.command
    'migrate'
    """
    return Plan(has_requirements, entries.get(RELEASE))


def check_process_type(process_type: str) -> None:
    """Refuse to run the ``release`` entry as a process: it is the release phase, run
    once per source and expected to end, not a command to keep running (Heroku does not
    scale it either); restarted "until deleted", a migration would run for ever.

    Raises:
        UnknownProcessType: ``process_type`` is ``release``.
    """
    if process_type == RELEASE:
        raise UnknownProcessType(
            'the Procfile\'s "release" entry is the release phase: it runs once per new '
            "source, before the processes of the app start, and is not a process type "
            "that can be run"
        )


def released_mark(app: str) -> str:
    """The name of the file that records a successful release of ``app`` in a build
    folder. Per app: two apps deployed from one archive (staging and production, each
    with its own database) each need their release run.

    App names are letters, digits, ``_``, ``.`` and ``-`` without ``..`` (the API checks
    them), so the name is a safe file name.

    >>> released_mark("shop")
    'released.shop'
    """
    return f"released.{app}"


def activate(env: Mapping[str, str], venv: str) -> dict[str, str]:
    """The environment ``env`` with the virtual environment ``venv`` in use, as its
    ``activate`` script would make it: its ``bin`` first on ``PATH``, ``VIRTUAL_ENV``
    set, ``PYTHONHOME`` unset.

    The ``bin`` goes in front of whatever ``PATH`` the layers below set, the request's
    ``env`` included, so that ``python`` and the installed scripts are the environment's
    whoever set ``PATH``; a program that wants another interpreter names it by path.

    >>> activate({"PATH": "/usr/bin", "PYTHONHOME": "/x"}, "/b/venv")
    {'PATH': '/b/venv/bin:/usr/bin', 'VIRTUAL_ENV': '/b/venv'}
    >>> activate({}, "/b/venv")["PATH"]
    '/b/venv/bin'
    """
    result = {name: value for name, value in env.items() if name not in _BREAKS_VENV}
    path = result.get("PATH")
    result["PATH"] = f"{venv}/bin:{path}" if path else f"{venv}/bin"
    result["VIRTUAL_ENV"] = venv
    return result


def venv_command(python: str, venv: str, *, with_pip: bool) -> list[str]:
    """The command that creates the virtual environment ``venv`` with the standard
    library's :mod:`venv`.

    ``-P``: the source root is the working folder, and a module of the source must not
    shadow one of the standard library. Without pip, it takes a tenth of a second, where
    ``ensurepip`` takes seconds.

    >>> venv_command("/usr/bin/python3", "/b/venv", with_pip=False)
    ['/usr/bin/python3', '-P', '-m', 'venv', '--without-pip', '/b/venv']
    """
    return [python, "-P", "-m", "venv", *([] if with_pip else ["--without-pip"]), venv]


def pip_command(python: str, venv_python: str | None) -> list[str]:
    """The command that installs ``requirements.txt`` (in the working folder, the source
    root: requirements may name local files, ``./vendor/x.whl``) into a virtual
    environment.

    ``python`` runs pip: the agent's interpreter with ``venv_python`` the environment's
    (pip's ``--python``, pip 22.3 and later), or, with ``venv_python`` of ``None``, the
    environment's own interpreter with the pip it was made with. ``--no-input``: nobody
    could answer a question (a password for an index); ``-u`` delivers the output line by
    line, as it comes.

    >>> pip_command("/usr/bin/python3", "/b/venv/bin/python")[5:8]
    ['--python', '/b/venv/bin/python', 'install']
    """
    target = [] if venv_python is None else ["--python", venv_python]
    return [
        python, "-P", "-u", "-m", "pip", *target, "install", "--no-input",
        "--disable-pip-version-check", "--progress-bar", "off", "-r", REQUIREMENTS,
    ]


def failure(step: str, outcome: str, tail: Iterable[str]) -> str:
    """The ``error`` of a failed build or release: the step, how it ended, and the last
    lines it wrote.

    >>> print(failure("the release command", "exited with code 3", ["no database"]))
    the release command exited with code 3; its last lines of output:
    no database
    """
    lines = list(tail)
    if not lines:
        return f"{step} {outcome}, without writing any output"
    return f"{step} {outcome}; its last lines of output:\n" + "\n".join(lines)
