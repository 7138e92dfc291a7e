"""The two Sphinx builds of ``tests/test_docs.py``, started as soon as the tests are
collected: they take ~20 and ~30 s of one core each while most of the suite uses one, so
they run beside the other tests instead of adding half a minute at the end."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BUILDERS = ("html", "doctest")
#: Where the session keeps the running builds (``None``: test_docs was not collected).
BUILDS_KEY = pytest.StashKey["Builds | None"]()


class Builds:
    """Both builds, running into a folder of their own."""

    def __init__(self) -> None:
        self.out = Path(tempfile.mkdtemp(prefix="smartmob-docs-"))
        self.running = {
            builder: subprocess.Popen(
                [sys.executable, "-m", "sphinx", "-W", "-n", "-q", "-b", builder, str(DOCS),
                 str(self.out / builder)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for builder in BUILDERS
        }

    def result(self, builder: str, timeout: float) -> tuple[int, str]:
        """The exit status and output of one build, once it has ended."""
        output, _ = self.running[builder].communicate(timeout=timeout)
        return self.running[builder].returncode, output

    def close(self) -> None:
        """Stop a build still running (the session ended early) and remove the output."""
        for build in self.running.values():
            if build.poll() is None:
                build.kill()
            build.communicate()
        shutil.rmtree(self.out, ignore_errors=True)


def start_if_collected(session: pytest.Session) -> None:
    """Start the builds if a docs build test is about to run."""
    wanted = any(item.nodeid.split("[")[0].endswith("test_docs.py::test_docs_build")
                 for item in session.items)
    session.config.stash[BUILDS_KEY] = Builds() if wanted else None


def close(session: pytest.Session) -> None:
    """End what :func:`start_if_collected` started."""
    builds = session.config.stash.get(BUILDS_KEY, None)
    if builds is not None:
        builds.close()
