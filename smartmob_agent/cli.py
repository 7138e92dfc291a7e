"""The ``smartmob-agent`` command: parse options, run the agent until a signal.

The only module that prints. It builds its parser from :data:`smartmob_agent.config.OPTIONS`,
makes the agent a child subreaper (orphaned grandchildren are reaped, not left as
zombies), binds its address (a taken port stops it before it touches the state folder),
starts the guardian (children die with the agent even on SIGKILL), starts the agent,
serves the app, and on SIGINT or SIGTERM stops every child and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ipaddress
import logging
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Sequence

from aiohttp import web

from smartmob_agent import __version__
from smartmob_agent.config import OPTIONS, Settings, check_settings, settings_from
from smartmob_agent.errors import AgentError, InvalidRequest
from smartmob_agent.output import logrecords
from smartmob_agent.output.endpoint import parse_endpoint
from smartmob_agent.output.sinks import open_handlers
from smartmob_agent.processes import guardian, heap, privacy
from smartmob_agent.processes.keeper import Keeper
from smartmob_agent.processes.reaper import Reaper, become_subreaper
from smartmob_agent.processes.users import resolve_run_as
from smartmob_agent.schemas import create_request
from smartmob_agent.supervision.agent import AGENT_ID_VARIABLE, Agent
from smartmob_agent.web.guard import GuardedSite
from smartmob_agent.web.server import AccessRecords, make_app

log = logging.getLogger("smartmob_agent")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every option also reads a ``SMARTMOB_*`` variable."""
    parser = argparse.ArgumentParser(
        prog="smartmob-agent",
        description=(
            "Run an HTTP service with a REST API that lets clients start Procfile "
            "applications as children of this program. Stop with CTRL-C or SIGTERM: "
            "every child is stopped first. Its log goes to stderr (--log-format text), "
            "or to stdout with warnings and errors on stderr (kv, json), or wherever "
            "--logging-endpoint says."
        ),
        epilog="Each option can also be set by the environment variable in brackets; "
        "a flag wins over the variable.",
    )
    parser.add_argument("--version", action="version", version=f"smartmob-agent {__version__}")
    for option in OPTIONS:
        if option.switch:
            parser.add_argument(
                option.flag, dest=option.name, default=None, action="store_const",
                const="true", help=f"{option.help} [{option.env}]",
            )
            continue
        parser.add_argument(
            option.flag, dest=option.name, metavar=option.metavar, default=None,
            help=f"{option.help} [{option.env}]",
            action="append" if option.repeat else "store",
        )
    return parser


def _configure_logging(settings: Settings) -> None:
    """Send every record (the warnings of :mod:`warnings` too) where the options say, in
    their format (see :mod:`smartmob_agent.output.sinks`)."""
    url = settings.logging_endpoint
    endpoint = None if url is None else parse_endpoint(url)  # checked by check_settings
    try:
        handlers = open_handlers(settings.log_format, endpoint, utc=settings.utc)
    except OSError as error:
        raise OptionRefused(
            f"smartmob-agent: cannot write the log to {url}: {error.strerror or error}"
        ) from None
    root = logging.getLogger()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # a line per request or state change is noise for a person reading text lines (a
    # FluentD endpoint gets records whatever the format)
    read_as_text = settings.log_format == "text" and (endpoint is None or endpoint.scheme == "file")
    quiet = read_as_text and settings.log_level != "debug"
    for name in logrecords.CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)
    logging.captureWarnings(True)


def _fatal(settings: Settings, message: str, status: int) -> int:
    """Report why the agent cannot go on, and return its exit status: one line on
    stderr in the ``text`` format without an endpoint (as always), else an ``exit``
    record (level error) where the records go."""
    if settings.log_format == "text" and settings.logging_endpoint is None:
        print(message, file=sys.stderr)
    else:
        logrecords.event(log, "exit", message, level=logging.ERROR, status=status)
    return status


def start_guardian(marker: str) -> subprocess.Popen[bytes]:
    """Start the guardian that kills the agent's descendants if the agent dies.

    It runs as the agent's user, as children may: it gets none of the agent's
    environment (its keys), no descriptor but its stdin pipe, stdout and stderr, and
    makes itself non-dumpable (see :mod:`smartmob_agent.processes.guardian`).

    Args:
        marker: the environment entry every child of the agent carries.
    """
    return subprocess.Popen(
        guardian.command(marker),
        stdin=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
        env=guardian.environment(os.environ),
    )


def _is_loopback(host: str) -> bool:
    # a name ("localhost" included) may resolve to anything: only a literal address counts
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context, or ``None`` without ``--tls-cert``."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as error:
        raise OptionRefused(
            f"smartmob-agent: cannot use the TLS certificate {settings.tls_cert} and key "
            f"{settings.tls_key}: {getattr(error, 'strerror', None) or error}"
        ) from None
    return context


_PR_SET_DUMPABLE = 4


#: Signals a parent commonly sets to "ignore" for the agent (``nohup``; ``&`` in a
#: script ignores SIGQUIT along with SIGINT).
_INHERITED_IGNORES = (signal.SIGHUP, signal.SIGQUIT)


def _handle_inherited_ignores(loop: asyncio.AbstractEventLoop) -> None:
    """Keep ignoring what the agent was told to ignore, but by a handler that does
    nothing: an ignored signal stays ignored across exec, a handled one does not, so its
    children get the default back (``nohup smartmob-agent`` must not make every app deaf
    to a ``signal`` control's SIGHUP)."""
    for number in _INHERITED_IGNORES:
        if signal.getsignal(number) == signal.SIG_IGN:
            loop.add_signal_handler(number, lambda: None)


def make_undumpable() -> bool:
    """Make the agent's memory and ``/proc/<pid>/environ`` unreadable by other processes
    of its user (Linux ``PR_SET_DUMPABLE`` 0): its children, running code from archives,
    must not read the keys it was given in ``SMARTMOB_TOKEN``. Children get the default
    back when they exec. Returns whether it worked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return False


def _warn_keys_in_argv(flags: dict[str, object]) -> None:
    if any(flags.get(name) for name in ("token", "app_token", "webhook_secret")):
        log.warning(
            "keys given with --token, --app-token or --webhook-secret can be read by every "
            "user of this machine in the process list; prefer --token-file, "
            "--app-tokens-file or the SMARTMOB_TOKEN (SMARTMOB_WEBHOOK_SECRET) variable"
        )


class OptionRefused(Exception):
    """What the options ask for cannot be done (a key file, the exposure rule, a
    certificate): one line on stderr, exit status 2, like a bad option."""


def _check_exposure(settings: Settings, keys_configured: bool) -> None:
    """Refuse to listen beyond loopback with no key, unless told ``--insecure``."""
    if _is_loopback(settings.host) or keys_configured:
        return
    if not settings.insecure:
        raise OptionRefused(
            f"smartmob-agent: refusing to listen on {settings.host} without a key: anyone "
            "who could reach the agent could run any command as this user. Give --token "
            "(or --token-file), listen on 127.0.0.1 behind an authenticating proxy, or "
            "pass --insecure if you really mean it."
        )
    log.warning(
        "INSECURE: listening on %s with NO key (--insecure): anyone who can reach this "
        "address can run any command as this user", settings.host,
    )


def _announce_user(agent: Agent) -> None:
    """Say whom the children run as; warn when that is root."""
    run_as = agent.run_as
    if run_as is not None:
        log.info("children run as user %s (uid %d, gid %d)", run_as.name, run_as.uid,
                 run_as.gid)
    elif os.geteuid() == 0:
        log.warning(
            "running as root without --user: every child, build and release command runs "
            "as root; give --user (an unprivileged user) to run them as that user"
        )


def _prepare_process(loop: asyncio.AbstractEventLoop) -> Reaper:
    """Set up the agent's own process: its environment hidden, a child subreaper whose
    ``SIGCHLD`` reaps orphans, inherited ignores kept off its children."""
    if not make_undumpable():  # pragma: no cover - Linux only
        log.warning("could not hide the agent's environment from its children")
    privacy.make_files_private()  # before the state folder; children keep the umask given
    heap.one_arena()  # before any thread: a malloc arena each would stay resident
    if not become_subreaper():  # pragma: no cover - Linux only
        log.warning("could not become a child subreaper: orphaned grandchildren may linger")
    reaper = Reaper()
    loop.add_signal_handler(signal.SIGCHLD, reaper.reap_orphans)
    _handle_inherited_ignores(loop)
    return reaper


def _make_agent(settings: Settings, reaper: Reaper) -> Agent:
    """The agent (not started yet), once its keys are read and the exposure rule holds."""
    try:
        agent = Agent(settings, reaper=reaper)
    except InvalidRequest as error:  # an unreadable key file
        raise OptionRefused(f"smartmob-agent: {error}") from None
    _check_exposure(settings, agent.keyring.enabled)
    return agent


async def _bind(
    runner: web.AppRunner, settings: Settings, tls: ssl.SSLContext | None
) -> GuardedSite:
    """Bind the listening sockets, without accepting connections yet.

    Done before the agent starts, so that a taken port stops the command before it creates
    or opens anything in the state folder. Its connections are held to the timeouts and
    the limit of :mod:`smartmob_agent.web.guard`.
    """
    site = GuardedSite(runner, settings, ssl_context=tls)
    try:
        await site.bind()
    except OSError as error:
        raise SystemExit(
            f"smartmob-agent: cannot listen on {settings.host}:{settings.port}: "
            f"{error.strerror}"
        ) from None
    return site


def _start_guardian(agent: Agent, reaper: Reaper) -> Keeper:
    """Start the guardian of the agent's children, and a new one whenever it dies."""
    marker = f"{AGENT_ID_VARIABLE}={agent.id}"
    keeper = Keeper(lambda: start_guardian(marker), reaper)
    keeper.start()
    return keeper


def _release_guardian(guardian: Keeper) -> None:
    """Close the guardian's input (end of file tells it the agent is gone), and wait the
    moment it takes to exit: its SIGCHLD then reaches a running event loop, not one being
    closed (whose signal wakeup pipe would print "Exception ignored" on stderr)."""
    guardian.release()
    guardian.wait_released(timeout=2.0)  # it finds nobody to kill after a clean stop


async def _start_agent(agent: Agent, settings: Settings) -> None:
    """Start the agent (its state folder, its processes), or exit with one line."""
    try:
        await agent.start()
    except AgentError as error:  # the state database, or a folder --user cannot reach
        raise SystemExit(f"smartmob-agent: {error}") from None
    except OSError as error:
        raise SystemExit(
            f"smartmob-agent: cannot use the state folder {settings.state_dir}: "
            f"{error.strerror or error}"
        ) from None


def _announce_ready(agent: Agent, runner: web.AppRunner, tls: bool) -> None:
    """Log the ready line, once per address served (scripts wait for it)."""
    _announce_user(agent)  # just before the ready line: a failed start stays one line
    scheme = "https" if tls else "http"
    for host, port, *_ in runner.addresses:
        shown = f"[{host}]" if ":" in host else host
        url = f"{scheme}://{shown}:{port}/"
        logrecords.event(
            log, "bind", f"smartmob-agent {__version__} listening on {url} (pid {os.getpid()})",
            transport="tcp", host=host, port=port, url=url, pid=os.getpid(),
            version=__version__,
        )


async def _shut_down(runner: web.AppRunner, agent: Agent, guardian: Keeper) -> None:
    """Stop listening, stop every process, close the clients, the agent, the guardian."""
    try:
        # stop listening, then stop every process while the events and attach clients
        # are still connected, so they see the stops; then close them (1001)
        for listening in list(runner.sites):
            await listening.stop()
        await agent.stop_all()
        await runner.cleanup()
    finally:
        try:
            await agent.close()
        finally:
            _release_guardian(guardian)


def _settle_memory() -> None:
    """Compile the schema of create requests now (every agent gets some), then give back
    what starting and that compilation freed: about 3 MB that would stay resident."""
    create_request.compile()
    heap.trim()


async def serve(settings: Settings) -> None:
    """Run the agent until SIGINT or SIGTERM, then stop every child and return."""
    loop = asyncio.get_running_loop()
    reaper = _prepare_process(loop)
    agent = _make_agent(settings, reaper)
    tls = _tls_context(settings)
    runner = web.AppRunner(
        make_app(settings, agent), handle_signals=False, access_log_class=AccessRecords,
        access_log=logging.getLogger(logrecords.ACCESS_LOGGER),
    )
    await runner.setup()
    try:
        site = await _bind(runner, settings, tls)
    except BaseException:
        await runner.cleanup()
        raise
    guardian = _start_guardian(agent, reaper)
    stop = asyncio.Event()
    why: list[str] = []  # the stop event's reason: the first signal's

    def told(reason: str) -> None:
        why.append(reason)
        stop.set()

    loop.add_signal_handler(signal.SIGINT, told, "ctrl-c")
    loop.add_signal_handler(signal.SIGTERM, told, "sigterm")
    try:
        await _start_agent(agent, settings)
    except BaseException:  # nothing was served: release what was taken for it
        site.close_unserved()
        await runner.cleanup()
        _release_guardian(guardian)
        raise
    try:
        await site.start()
        _settle_memory()
        _announce_ready(agent, runner, tls is not None)
        await stop.wait()
        logrecords.event(log, "stop", "stopping: shutting down every process", reason=why[0])
    finally:
        await _shut_down(runner, agent, guardian)
    logrecords.event(log, "exit", "stopped", status=0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``smartmob-agent``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(vars(args), os.environ)
        check_settings(settings)
        resolve_run_as(settings.user, settings.group)  # an unknown user stops it here
    except InvalidRequest as error:
        print(f"smartmob-agent: {error}", file=sys.stderr)
        return 2
    try:
        _configure_logging(settings)
    except OptionRefused as error:  # nowhere to log it but stderr
        print(error, file=sys.stderr)
        return 2
    _warn_keys_in_argv(vars(args))
    try:
        asyncio.run(serve(settings))
    except OptionRefused as error:
        return _fatal(settings, str(error), 2)
    except SystemExit as exit:
        if isinstance(exit.code, str):
            return _fatal(settings, exit.code, 1)
        raise
    return 0
