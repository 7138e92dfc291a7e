"""Settings of the agent, and where each comes from: pure.

Twelve-factor: every option is a command-line flag and a ``SMARTMOB_*`` environment
variable, the flag winning. :data:`OPTIONS` is the single table of them; the CLI builds
its parser from it and the docs list it.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from smartmob_agent.errors import InvalidRequest
from smartmob_agent.keys import check_key, split_app_key
from smartmob_agent.output.endpoint import parse_endpoint
from smartmob_agent.sources.fetchpolicy import parse_allow_entry
from smartmob_agent.web.access import normal_origin


@dataclass(frozen=True)
class Settings:
    """Everything the agent is configured with. Defaults are safe and useful."""

    host: str = "127.0.0.1"
    port: int = 8080
    state_dir: Path = Path(".smartmob")
    stop_timeout: float = 10.0
    build_timeout: float = 600.0
    max_body: int = 1024 * 1024
    header_timeout: float = 20.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    #: ``None``: half the agent's open-file limit, worked out at start
    max_connections: int | None = None
    max_download: int = 512 * 1024 * 1024
    download_stall: float = 30.0
    download_timeout: float = 600.0
    max_unpacked: int = 2 * 1024**3
    max_members: int = 50_000
    max_member_size: int = 1024**3
    max_ratio: float = 200.0
    max_path_length: int = 1024
    source_allow: tuple[str, ...] = ()
    allow_file_sources: Path | None = None
    log_level: str = "info"
    log_format: str = "text"
    utc: bool = False
    logging_endpoint: str | None = None
    webhook: tuple[str, ...] = ()
    webhook_secret: str | None = None
    monitor_interval: float = 2.0
    log_lines: int = 1000
    log_max_bytes: int = 10 * 1024 * 1024
    log_files: int = 3
    # keys are secrets: never shown by repr() (which a log line or traceback might print)
    token: tuple[str, ...] = field(default=(), repr=False)
    token_file: Path | None = None
    app_token: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    app_tokens_file: Path | None = None
    insecure: bool = False
    allow_host: tuple[str, ...] = ()
    allow_origin: tuple[str, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    trusted_proxy: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    user: str | None = None
    group: str | None = None


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
    #: the flag takes no value (it means ``true``); the variable says true or false
    switch: bool = False
    #: the value is a secret: an error about it never repeats it
    secret: bool = False


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


def _count(text: str) -> int:
    value = _integer(text)
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    # an address is a network of one; host bits set (10.0.0.5/8) mean the network
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(
            "must be an address (127.0.0.1, ::1) or a network (10.0.0.0/8)"
        ) from None


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("must be a number of at least 1") from None
    if not 1 <= value < math.inf:
        raise ValueError("must be a number of at least 1")
    return value


def _absolute_folder(text: str) -> Path:
    # relative to what? the agent's current folder is not something to rely on here
    if not text.startswith("/"):
        raise ValueError("must be an absolute folder name")
    return Path(text)


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


#: The formats of the agent's log records (``--log-format``).
LOG_FORMATS = ("text", "kv", "json")


def _log_format(text: str) -> str:
    name = text.strip().lower()
    if name not in LOG_FORMATS:
        raise ValueError("must be one of text, kv, json")
    return name


def _endpoint(text: str) -> str:
    # checked whole by check_settings, which says it as the original agent did
    if not text.strip():
        raise ValueError("must be a URL, not empty")
    return text.strip()


def _host(text: str) -> str:
    # an empty host would make the server listen on every interface, unannounced
    host = text.strip()
    if not host:
        raise ValueError("must be an address, not empty (0.0.0.0 means every interface)")
    return host


def _host_name(text: str) -> str:
    name = text.strip().lower().rstrip(".")
    if not HOST_NAME.fullmatch(name) or len(name) > 253:
        raise ValueError(
            "must be a host name such as smartmob-agent or agent.example.org, or *.domain "
            "for every name under a domain (no port, no scheme)"
        )
    return name


def _origin(text: str) -> str:
    origin = normal_origin(text)
    if origin is None:
        raise ValueError(
            "must be the origin of a web page: http:// or https://, a host and maybe a "
            "port, nothing after (such as https://dashboard.example.org:8443)"
        )
    return origin


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


def _switch(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"", "0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


def _account(text: str) -> str:
    # a name or a number; whether it exists is for the agent to find out at start
    name = text.strip()
    if not name or any(c.isspace() or c in ":/" for c in name):
        raise ValueError("must be a user or group name, or a number")
    return name


def _secret(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text


#: A DNS name, or ``*.`` and a domain: what ``--allow-host`` takes.
HOST_NAME = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*")

OPTIONS: tuple[Option, ...] = (
    Option("host", "--host", "SMARTMOB_HOST", _host, "ADDRESS",
           "address to listen on (default: 127.0.0.1)"),
    Option("port", "--port", "SMARTMOB_PORT", _port, "PORT",
           "TCP port to listen on; 0 picks a free one (default: 8080)"),
    Option("state_dir", "--state-dir", "SMARTMOB_STATE_DIR", _folder, "DIR",
           "folder for downloads and unpacked sources (default: ./.smartmob)"),
    Option("stop_timeout", "--stop-timeout", "SMARTMOB_STOP_TIMEOUT", _positive, "SECONDS",
           "grace period between SIGTERM and SIGKILL when stopping a process (default: 10)"),
    Option("build_timeout", "--build-timeout", "SMARTMOB_BUILD_TIMEOUT", _positive,
           "SECONDS", "longest a source's build (virtual environment and pip install) or "
           "its release command may take before it is stopped (default: 600)"),
    Option("max_body", "--max-body", "SMARTMOB_MAX_BODY", _size, "BYTES",
           "largest request body accepted; larger ones get 413 (default: 1048576)"),
    Option("header_timeout", "--header-timeout", "SMARTMOB_HEADER_TIMEOUT", _positive,
           "SECONDS", "longest a client may take to send a request's line and headers, "
           "from their first byte; then it gets 408 and is disconnected (default: 20)"),
    Option("body_timeout", "--body-timeout", "SMARTMOB_BODY_TIMEOUT", _positive,
           "SECONDS", "longest a request body may take to arrive, plus one second per KiB "
           "received (so a steady upload is never cut); then 408 (default: 60)"),
    Option("keepalive_timeout", "--keepalive-timeout", "SMARTMOB_KEEPALIVE_TIMEOUT",
           _positive, "SECONDS", "close a connection that has been waiting this long for "
           "a request (a new one, or the next one); WebSockets are not cut (default: 75)"),
    Option("max_connections", "--max-connections", "SMARTMOB_MAX_CONNECTIONS", _count,
           "COUNT", "most client connections open at once; past it, a new one closes the "
           "longest-idle one, or gets 503 when none is idle (default: half the open-file "
           "limit, ulimit -n)"),
    Option("max_download", "--max-download", "SMARTMOB_MAX_DOWNLOAD", _size, "BYTES",
           "largest source archive downloaded or uploaded (default: 536870912)"),
    Option("download_stall", "--download-stall", "SMARTMOB_DOWNLOAD_STALL", _positive,
           "SECONDS", "give up a download that receives no byte for this long (default: 30)"),
    Option("download_timeout", "--download-timeout", "SMARTMOB_DOWNLOAD_TIMEOUT", _positive,
           "SECONDS", "give up a download that takes longer than this (default: 600)"),
    Option("max_unpacked", "--max-unpacked", "SMARTMOB_MAX_UNPACKED", _size, "BYTES",
           "most bytes a source archive may unpack to in all (default: 2147483648)"),
    Option("max_members", "--max-members", "SMARTMOB_MAX_MEMBERS", _count, "COUNT",
           "most files, folders and links in a source archive (default: 50000)"),
    Option("max_member_size", "--max-member-size", "SMARTMOB_MAX_MEMBER_SIZE", _size,
           "BYTES", "largest file in a source archive, unpacked (default: 1073741824)"),
    Option("max_ratio", "--max-ratio", "SMARTMOB_MAX_RATIO", _ratio, "RATIO",
           "most bytes unpacked per byte of archive, checked once an archive has "
           "unpacked 64 MiB (default: 200)"),
    Option("max_path_length", "--max-path-length", "SMARTMOB_MAX_PATH_LENGTH", _count,
           "CHARACTERS", "longest member name or link target in a source archive "
           "(default: 1024)"),
    Option("source_allow", "--source-allow", "SMARTMOB_SOURCE_ALLOW", parse_allow_entry,
           "HOST", "fetch sources only from this host (a name, *.domain, an address or a "
           "network); repeat for more (the variable takes them separated by spaces); "
           "default: any host", repeat=True),
    Option("allow_file_sources", "--allow-file-sources", "SMARTMOB_ALLOW_FILE_SOURCES",
           _absolute_folder, "DIR", "accept file:// source URLs of files under this "
           "absolute folder (default: none)"),
    Option("log_level", "--log-level", "SMARTMOB_LOG_LEVEL", _level, "LEVEL",
           "least severe level of the agent's log records written (default: info)"),
    Option("log_format", "--log-format", "SMARTMOB_LOG_FORMAT", _log_format, "FORMAT",
           "how log records are written: text, one line for a person (default); kv, "
           "key=value pairs; json, one JSON object a line (kv and json have sorted keys, "
           "an ISO 8601 @timestamp and an event name)"),
    Option("utc", "--utc", "SMARTMOB_UTC", _switch, "",
           "write the time of log records in UTC (+00:00) rather than local time",
           switch=True),
    Option("logging_endpoint", "--logging-endpoint", "SMARTMOB_LOGGING_ENDPOINT",
           _endpoint, "URL", "write every log record there, and nothing to stdout or "
           "stderr: file:///dev/stdout, file:///dev/stderr, file://./relative.log, "
           "file:///absolute.log, or fluent://host:port/tag for a FluentD forward input "
           "(default: text to stderr; kv and json to stdout, warnings and errors to "
           "stderr)"),
    Option("webhook", "--webhook", "SMARTMOB_WEBHOOK", _webhook, "URL",
           "POST every process event as JSON to this URL; repeat for more URLs (the "
           "variable takes them separated by spaces)", repeat=True),
    Option("webhook_secret", "--webhook-secret", "SMARTMOB_WEBHOOK_SECRET", _secret,
           "SECRET", "sign webhook bodies with HMAC-SHA256 and this key, in the "
           "X-Smartmob-Signature header", secret=True),
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
    Option("token", "--token", "SMARTMOB_TOKEN", check_key, "KEY",
           "admin key: every request but GET /healthz must carry it as 'Authorization: "
           "Bearer KEY'; repeat to accept several (while rotating)", repeat=True, secret=True),
    Option("token_file", "--token-file", "SMARTMOB_TOKEN_FILE", _folder, "FILE",
           "read admin keys from this file, one per line (# starts a comment), so that "
           "no key sits in the command line"),
    Option("app_token", "--app-token", "SMARTMOB_APP_TOKEN", split_app_key, "APP=KEY",
           "a key that sees and acts on the processes of app APP only; repeat for more",
           repeat=True, secret=True),
    Option("app_tokens_file", "--app-tokens-file", "SMARTMOB_APP_TOKENS_FILE", _folder,
           "FILE", "read app keys from this file, one APP=KEY per line"),
    Option("insecure", "--insecure", "SMARTMOB_INSECURE", _switch, "",
           "allow listening on a non-loopback address without any key (anyone who can "
           "reach the agent can then run any command)", switch=True),
    Option("allow_host", "--allow-host", "SMARTMOB_ALLOW_HOST", _host_name, "NAME",
           "also answer requests whose Host is this name (e.g. a docker-compose service "
           "name), or any name under a domain with *.example.org; an agent without keys "
           "otherwise answers only IP addresses, localhost and --host (a guard against DNS "
           "rebinding); repeat for more (the variable takes them separated by spaces)",
           repeat=True),
    Option("allow_origin", "--allow-origin", "SMARTMOB_ALLOW_ORIGIN", _origin, "URL",
           "answer cross-origin requests (CORS, preflights included) from the web pages "
           "of this origin, such as another agent's dashboard; only with keys, which the "
           "pages still send; repeat for more (the variable takes them separated by "
           "spaces)", repeat=True),
    Option("tls_cert", "--tls-cert", "SMARTMOB_TLS_CERT", _folder, "FILE",
           "serve HTTPS with this certificate chain (PEM); needs --tls-key"),
    Option("tls_key", "--tls-key", "SMARTMOB_TLS_KEY", _folder, "FILE",
           "the private key (PEM) of --tls-cert"),
    Option("trusted_proxy", "--trusted-proxy", "SMARTMOB_TRUSTED_PROXY", _network,
           "ADDRESS", "a reverse proxy (an address or a network) whose Forwarded and "
           "X-Forwarded-Proto/-Host headers the links follow; repeat for more (the "
           "variable takes them separated by spaces); default: none", repeat=True),
    Option("user", "--user", "SMARTMOB_USER", _account, "USER",
           "run every child (builds and release commands too) as this user, a name or "
           "uid; needs root, unless it names the agent's own user (default: the agent's "
           "user)"),
    Option("group", "--group", "SMARTMOB_GROUP", _account, "GROUP",
           "with --user: run the children with this group instead of the user's primary "
           "group (default: the user's primary group)"),
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
            shown = "the value given" if option.secret else repr(raw)
            problems[source] = f"{shown} is not valid: {error}"
    if problems:
        detail = "; ".join(f"{name}: {why}" for name, why in problems.items())
        raise InvalidRequest(f"invalid configuration: {detail}", problems)
    return Settings(**values)


def check_settings(settings: Settings) -> None:
    """Check what no single option can: the options that go together.

    Raises:
        InvalidRequest: naming the options that do not fit together.
    """
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise InvalidRequest(
            "invalid configuration: --tls-cert and --tls-key go together: give both or "
            "neither", {"--tls-cert": "needs --tls-key", "--tls-key": "needs --tls-cert"},
        )
    if settings.logging_endpoint is not None:
        try:
            parse_endpoint(settings.logging_endpoint)
        except ValueError as error:  # the original agent's words, alone
            raise InvalidRequest(str(error), {"--logging-endpoint": str(error)}) from None
    keyed = settings.token or settings.token_file or settings.app_token or (
        settings.app_tokens_file)
    if settings.allow_origin and not keyed:
        raise InvalidRequest(
            "invalid configuration: --allow-origin needs keys (--token, --token-file, "
            "--app-token or --app-tokens-file): an agent without keys answers no page of "
            "another origin", {"--allow-origin": "needs keys"},
        )
    if settings.group is not None and settings.user is None:
        raise InvalidRequest(
            "invalid configuration: --group goes with --user: it chooses the group of the "
            "user the children run as", {"--group": "needs --user"},
        )
