"""The command line's own pieces: its parser and its address check."""

from __future__ import annotations

import pytest

from smartmob_agent.cli import _is_loopback, build_parser
from smartmob_agent.config import OPTIONS


def test_parser_has_every_option_with_its_variable() -> None:
    """Every option of the settings table is a flag whose help names its variable."""
    help_text = build_parser().format_help()
    for option in OPTIONS:
        assert option.flag in help_text
        assert option.env in help_text


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("0.0.0.0", False),
     ("::", False), ("192.168.1.5", False), ("localhost", False)],
)
def test_loopback_check(host: str, loopback: bool) -> None:
    """Only loopback addresses count as safe to serve without authentication."""
    assert _is_loopback(host) is loopback
