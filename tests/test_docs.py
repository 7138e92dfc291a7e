"""The documentation builds without a warning, and its examples pass against a live agent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("builder", ["html", "doctest"])
def test_docs_build(builder: str, tmp_path: Path) -> None:
    """sphinx-build -W -n succeeds: no warning, no broken reference, no failing doctest
    (the doctests start the real smartmob-agent and follow the walkthrough)."""
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-n", "-q", "-b", builder, str(DOCS),
         str(tmp_path / builder)],
        capture_output=True, text=True, timeout=170, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
