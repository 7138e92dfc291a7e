"""Settings of the agent, and where each comes from: pure.

Twelve-factor: every option is a command-line flag and a ``SMARTMOB_*`` environment
variable, the flag winning. :data:`OPTIONS` is the single table of them; the CLI builds
its parser from it and the docs list it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from smartmob_agent.errors import InvalidRequest


@dataclass(frozen=True)
class Settings:
    """Everything the agent is configured with. Defaults are safe and useful."""

    host: str = "127.0.0.1"
    port: int = 8080
    state_dir: Path = Path(".smartmob")
    stop_timeout: float = 10.0
    max_body: int = 1024 * 1024
    max_download: int = 512 * 1024 * 1024
    download_stall: float = 30.0
    download_timeout: float = 600.0
    log_level: str = "info"
    webhook: tuple[str, ...] = ()
    webhook_secret: str | None = None
    monitor_interval: float = 2.0
    log_lines: int = 1000
    log_max_bytes: int = 10 * 1024 * 1024
    log_files: int = 3


@dataclass(frozen=True)
class Option:
    """One setting as the CLI and the environment spell it."""

    name: str
    flag: str
    env: str
    parse: Callable[[str], Any]
    metavar: str
    help: str
    #: the flag may be given many times; the variable holds values separated by spaces
    repeat: bool = False


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("must be a whole number") from None


def _port(text: str) -> int:
    port = _integer(text)
    if not 0 <= port <= 65535:
        raise ValueError("a port is a number from 0 to 65535")
    return port


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("must be a positive number of seconds") from None
    # "nan" fails the comparison; "inf" would mean never giving up
    if not 0 < value < math.inf:
        raise ValueError("must be a positive number of seconds")
    return value


def _size(text: str) -> int:
    value = _integer(text)
    if value <= 0:
        raise ValueError("must be a positive number of bytes")
    return value


def _lines(text: str) -> int:
    value = _integer(text)
    if not 1 <= value <= 1_000_000:
        raise ValueError("must be a number of lines from 1 to 1000000")
    return value


def _bytes_or_off(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise ValueError("must be a number of bytes, or 0 for no log files")
    return value


def _file_count(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= 1000:
        raise ValueError("must be a number of files from 0 to 1000")
    return value


def _level(text: str) -> str:
    level = text.lower()
    if level not in {"debug", "info", "warning", "error"}:
        raise ValueError("must be one of debug, info, warning, error")
    return level


def _host(text: str) -> str:
    # an empty host would make the server listen on every interface, unannounced
    host = text.strip()
    if not host:
        raise ValueError("must be an address, not empty (0.0.0.0 means every interface)")
    return host


def _folder(text: str) -> Path:
    # an empty value would silently mean the current folder
    if not text.strip():
        raise ValueError("must be a folder name, not empty")
    return Path(text)


def _webhook(text: str) -> str:
    url = text.strip()
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in {"http", "https"} or not rest or any(c.isspace() for c in url):
        raise ValueError("must be an http:// or https:// URL")
    return url


def _secret(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text


OPTIONS: tuple[Option, ...] = (
    Option("host", "--host", "SMARTMOB_HOST", _host, "ADDRESS",
           "address to listen on (default: 127.0.0.1)"),
    Option("port", "--port", "SMARTMOB_PORT", _port, "PORT",
           "TCP port to listen on; 0 picks a free one (default: 8080)"),
    Option("state_dir", "--state-dir", "SMARTMOB_STATE_DIR", _folder, "DIR",
           "folder for downloads and unpacked sources (default: ./.smartmob)"),
    Option("stop_timeout", "--stop-timeout", "SMARTMOB_STOP_TIMEOUT", _positive, "SECONDS",
           "grace period between SIGTERM and SIGKILL when stopping a process (default: 10)"),
    Option("max_body", "--max-body", "SMARTMOB_MAX_BODY", _size, "BYTES",
           "largest request body accepted; larger ones get 413 (default: 1048576)"),
    Option("max_download", "--max-download", "SMARTMOB_MAX_DOWNLOAD", _size, "BYTES",
           "largest source archive downloaded (default: 536870912)"),
    Option("download_stall", "--download-stall", "SMARTMOB_DOWNLOAD_STALL", _positive,
           "SECONDS", "give up a download that receives no byte for this long (default: 30)"),
    Option("download_timeout", "--download-timeout", "SMARTMOB_DOWNLOAD_TIMEOUT", _positive,
           "SECONDS", "give up a download that takes longer than this (default: 600)"),
    Option("log_level", "--log-level", "SMARTMOB_LOG_LEVEL", _level, "LEVEL",
           "least severe log level written to stderr (default: info)"),
    Option("webhook", "--webhook", "SMARTMOB_WEBHOOK", _webhook, "URL",
           "POST every process event as JSON to this URL; repeat for more URLs (the "
           "variable takes them separated by spaces)", repeat=True),
    Option("webhook_secret", "--webhook-secret", "SMARTMOB_WEBHOOK_SECRET", _secret,
           "SECRET", "sign webhook bodies with HMAC-SHA256 and this key, in the "
           "X-Smartmob-Signature header"),
    Option("monitor_interval", "--monitor-interval", "SMARTMOB_MONITOR_INTERVAL", _positive,
           "SECONDS", "how often CPU and memory of every process tree are sampled "
           "(default: 2)"),
    Option("log_lines", "--log-lines", "SMARTMOB_LOG_LINES", _lines, "LINES",
           "output lines of each process kept in memory (default: 1000)"),
    Option("log_max_bytes", "--log-max-bytes", "SMARTMOB_LOG_MAX_BYTES", _bytes_or_off,
           "BYTES", "size at which a process's output log file is rotated; 0 keeps no "
           "log files, only the lines in memory (default: 10485760)"),
    Option("log_files", "--log-files", "SMARTMOB_LOG_FILES", _file_count, "COUNT",
           "rotated output log files kept per process, besides the current one "
           "(default: 3)"),
)

assert {option.name for option in OPTIONS} == {f.name for f in fields(Settings)}


def settings_from(
    flags: Mapping[str, str | list[str] | None], environ: Mapping[str, str]
) -> Settings:
    """Build :class:`Settings` from flag values (``None`` when not given) and environment.

    Raises:
        InvalidRequest: naming each option whose value cannot be used.
    """
    values: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for option in OPTIONS:
        raw = flags.get(option.name)
        source = option.flag
        if raw is None:
            raw = environ.get(option.env)
            source = option.env
        if raw is None:
            continue
        try:
            if option.repeat:
                given = raw.split() if isinstance(raw, str) else raw
                values[option.name] = tuple(option.parse(item) for item in given)
            else:
                assert isinstance(raw, str)
                values[option.name] = option.parse(raw)
        except ValueError as error:
            problems[source] = f"{raw!r} is not valid: {error}"
    if problems:
        detail = "; ".join(f"{name}: {why}" for name, why in problems.items())
        raise InvalidRequest(f"invalid configuration: {detail}", problems)
    return Settings(**values)
