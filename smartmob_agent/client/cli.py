"""The ``smartmob`` command: drive one agent or a fleet from a terminal or a script.

Run ``smartmob --help`` for the commands and ``smartmob COMMAND --help`` for each one's
options and an example. Exit statuses: 0 ok, 1 a process (or a request) failed, 2 a
usage error, 3 an agent is unreachable, 4 a key was refused, 5 something was not found.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import NoReturn

from smartmob_agent import __version__
from smartmob_agent.client import apply, commands, completion, deploy, follow, top
from smartmob_agent.client.agent import AgentClient
from smartmob_agent.client.errors import ClientError
from smartmob_agent.client.fleet import Fleet
from smartmob_agent.client.targets import (
    Target,
    UsageError,
    config_path,
    load_config,
    select,
)
from smartmob_agent.client.terminal import OK, USAGE, Terminal, exit_status

Handler = Callable[[argparse.Namespace, Fleet, Terminal], Awaitable[int]]

#: Commands that follow a stream until CTRL-C, which ends them with status 0.
FOLLOWING = frozenset({"attach", "events", "top"})

#: Each command: its summary, and the examples its --help shows.
COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ls": ("list the processes of the agents", ("smartmob ls", "smartmob ls --all --app shop")),
    "status": ("show the status of one process", ("smartmob status shop.web.0",)),
    "create": ("create a process from a source archive's URL", (
        "smartmob create shop web.0 https://example.com/shop.tgz --env GREETING=hi --wait",)),
    "rm": ("delete processes (stop them and forget them)", (
        "smartmob rm shop.web.0", "smartmob rm --app shop")),
    "start": ("start stopped, exited or failed processes", (
        "smartmob start shop.web.0", "smartmob start --app shop")),
    "stop": ("stop processes (they stay listed)", (
        "smartmob stop shop.web.0", "smartmob stop --all")),
    "restart": ("stop and start processes again", (
        "smartmob restart shop.web.0", "smartmob restart --app shop --all")),
    "signal": ("send a signal to a running process", ("smartmob signal shop.web.0 HUP",)),
    "logs": ("show the last output lines of a process, or follow them", (
        "smartmob logs shop.web.0 --tail 20", "smartmob logs shop.web.0 -f")),
    "attach": ("attach to a process: its output here, typed lines to its input", (
        "smartmob attach shop.web.0",)),
    "events": ("follow what happens to the processes, as it happens", (
        "smartmob events --app shop", "smartmob events --all --json")),
    "upload": ("upload a source archive, or a folder packed by its .gitignore", (
        "smartmob upload ./shop",)),
    "tokens": ("list the minted app keys, or revoke one", (
        "smartmob tokens", "smartmob tokens --revoke 3f9c2a17")),
    "version": ("show the versions of the client and of the agents", (
        "smartmob version --all",)),
    "deploy": ("deploy a folder: pack, upload, create the formation's nodes, wait", (
        "smartmob deploy ./shop --app shop --process web=2 --process worker=1",)),
    "scale": ("create or delete an app's nodes to reach a count per type", (
        "smartmob scale shop web=3 worker=0 --source ./shop",)),
    "plan": ("show what apply would change to reach a smartmob.toml", (
        "smartmob plan", "smartmob plan --file staging.toml --all")),
    "apply": ("converge the agents to a smartmob.toml: create, update, prune", (
        "smartmob apply", "smartmob apply --file staging.toml --prune")),
    "top": ("a live table of the processes, redrawn as they change", (
        "smartmob top --all",)),
    "completion": ("print the shell completion script of smartmob", (
        'eval "$(smartmob completion bash)"',)),
}


def _common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The options of every command (also accepted before the command's name)."""
    default = argparse.SUPPRESS if suppress else None
    group = parser.add_argument_group("agents and output")
    group.add_argument("--agent", action="append", metavar="URL|NAME",
                       default=argparse.SUPPRESS if suppress else [],
                       help="an agent: a URL, or a name from the config file; repeat it "
                       "to act on several [default: $SMARTMOB_URL, the config file's "
                       "default, else http://127.0.0.1:8080]")
    group.add_argument("--all", action="store_true",
                       default=argparse.SUPPRESS if suppress else False,
                       help="every agent of the config file; for rm, start, stop and "
                       "restart without SLUG or --app, also every process")
    group.add_argument("--json", action="store_true",
                       default=argparse.SUPPRESS if suppress else False,
                       help="write JSON: one document (one per line for streams)")
    group.add_argument("--config", metavar="FILE", default=default,
                       help="the config file of named agents [default: "
                       "$SMARTMOB_CONFIG, else ~/.config/smartmob/agents.toml]")
    group.add_argument("--timeout", metavar="SECONDS", type=_seconds,
                       default=argparse.SUPPRESS if suppress else 60.0,
                       help="how long one request may take [default: 60]")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a whole number from 0: {text!r}")
    return int(text)


def _add_arguments(name: str, sub: argparse.ArgumentParser) -> None:
    """The arguments of command ``name``."""
    if name in {"ls", "events"}:
        sub.add_argument("--app", help="only the processes of this app")
    if name in {"status", "signal", "logs", "attach"}:
        sub.add_argument("slug", metavar="SLUG", help="the process: APP.NODE (shop.web.0)")
    if name in {"rm", "start", "stop", "restart"}:
        sub.add_argument("slug", metavar="SLUG", nargs="?", help="the process: APP.NODE")
        sub.add_argument("--app", help="every process of this app")
    if name == "signal":
        sub.add_argument("signal", metavar="SIGNAL",
                         help="TERM, INT, QUIT, HUP, KILL, USR1 or USR2 (SIG is optional)")
    if name == "logs":
        sub.add_argument("-f", "--follow", action="store_true",
                         help="keep following new lines until CTRL-C")
        sub.add_argument("--tail", metavar="N", type=_count,
                         help="the last N lines [default: 100]")
        sub.add_argument("--since", metavar="TIME",
                         help="the lines since TIME: ISO 8601 (2026-12-01T18:00:00Z) or "
                         "seconds since the epoch")
    if name == "events":
        sub.add_argument("--slug", help="only the events of this process")
    if name == "create":
        _add_create_arguments(sub)
    if name == "upload":
        sub.add_argument("path", metavar="DIR|FILE",
                         help="an archive (zip or tar), or a folder to pack as .tar.gz")
        sub.add_argument("--no-ignore", action="store_true",
                         help="pack every file of the folder (but .git), ignoring the "
                         ".gitignore and .smartmobignore files")
    if name == "tokens":
        sub.add_argument("--revoke", metavar="ID", help="revoke the minted key of this id")
    if name in {"deploy", "scale"}:
        _add_rollout_arguments(name, sub)
    if name in {"plan", "apply"}:
        _add_apply_arguments(name, sub)
    if name == "top":
        sub.add_argument("--interval", metavar="SECONDS", type=_seconds, default=2.0,
                         help="how often CPU and memory are read again [default: 2]")
        sub.add_argument("--once", action="store_true", help="draw the table once, and end")
    if name == "completion":
        sub.add_argument("shell", metavar="SHELL", choices=("bash", "zsh"),
                         help="bash or zsh")


def _add_rollout_arguments(name: str, sub: argparse.ArgumentParser) -> None:
    if name == "deploy":
        sub.add_argument("folder", metavar="DIR", help="the app's folder (with its Procfile)")
        sub.add_argument("--app", required=True, help="the application's name")
        sub.add_argument("-p", "--process", action="append", metavar="TYPE=COUNT",
                         help="how many processes of a Procfile type to run (repeatable)")
        _add_rolling_arguments(sub)
    else:
        sub.add_argument("app", metavar="APP", help="the application's name")
        sub.add_argument("formation", metavar="TYPE=COUNT", nargs="+",
                         help="how many processes of a type to run")
        sub.add_argument("--source", metavar="DIR|FILE|URL",
                         help="the source of new nodes: a folder or archive to upload, "
                         "or the URL of an archive")
        sub.add_argument("--checksum", metavar="sha256:HEX",
                         help="the checksum of the archive at a --source URL")
    sub.add_argument("-e", "--env", action="append", metavar="NAME=VALUE",
                     help="an environment variable of the new processes (repeatable)")
    sub.add_argument("-o", "--option", action="append", metavar="NAME=JSON",
                     help="a supervision option of the new processes, in JSON "
                     "(repeatable)")
    sub.add_argument("--wait-timeout", metavar="SECONDS", type=_seconds, default=120.0,
                     help="how long to wait for the processes to run [default: 120]")
    sub.add_argument("--no-ignore", action="store_true",
                     help="pack every file of a folder (but .git)")


def _add_apply_arguments(name: str, sub: argparse.ArgumentParser) -> None:
    sub.add_argument("-f", "--file", metavar="FILE",
                     help="the file of the apps [default: smartmob.toml]")
    sub.add_argument("--prune", action="store_true",
                     help="delete the nodes of the file's apps that it no longer names")
    sub.add_argument("--update-all", action="store_true",
                     help="update every node, changed or not (the agent does not show "
                     "environments: use it after changing only env)")
    sub.add_argument("--no-ignore", action="store_true",
                     help="pack every file of the apps' folders (but .git)")
    if name == "apply":
        _add_rolling_arguments(sub)
        sub.add_argument("--wait-timeout", metavar="SECONDS", type=_seconds, default=120.0,
                         help="how long to wait for each process to run [default: 120]")


def _add_rolling_arguments(sub: argparse.ArgumentParser) -> None:
    """How running nodes are updated (deploy and apply)."""
    sub.add_argument("--parallel", metavar="N", type=_positive, default=1,
                     help="update N nodes of an agent at a time [default: 1]")
    sub.add_argument("--no-rollback", action="store_true",
                     help="when an update fails, keep the nodes already updated (by "
                     "default they are rolled back to their previous source)")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number from 1: {text!r}")
    return int(text)


def _add_create_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("app", metavar="APP", help="the application's name")
    sub.add_argument("node", metavar="NODE", help="the process's name: TYPE.N (web.0)")
    sub.add_argument("source", metavar="SOURCE_URL",
                     help="the URL of the source archive (see 'smartmob upload')")
    sub.add_argument("-t", "--type", metavar="TYPE",
                     help="the Procfile entry to run [default: NODE up to its first '.']")
    sub.add_argument("-e", "--env", action="append", metavar="NAME=VALUE",
                     help="an environment variable of the process (repeatable)")
    sub.add_argument("--checksum", metavar="sha256:HEX",
                     help="the archive's checksum, checked before it is unpacked")
    sub.add_argument("-o", "--option", action="append", metavar="NAME=JSON",
                     help="a supervision option, its value in JSON: restart=never, "
                     "'health={\"http\": \"/\"}' (repeatable)")
    sub.add_argument("-w", "--wait", action="store_true",
                     help="wait until the process runs (for its start_seconds, and passes its "
                     "health check)")
    sub.add_argument("--wait-timeout", metavar="SECONDS", type=_seconds, default=120.0,
                     help="how long --wait waits [default: 120]")


class _Parser(argparse.ArgumentParser):
    """argparse, saying a usage error in one sentence like every other error of
    ``smartmob`` (argparse prints the whole usage block first), with where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"smartmob: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``smartmob`` and its commands."""
    parser = _Parser(
        prog="smartmob",
        description="Drive smartmob agents: list, create, control and follow the processes "
        "of one agent or of a fleet.",
        epilog="exit statuses: 0 ok, 1 a process or request failed, 2 usage,\n"
        "  3 an agent is unreachable, 4 a key was refused, 5 not found\n\n"
        "example:\n  smartmob ls --all",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"smartmob {__version__}")
    _common(parser, suppress=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (summary, examples) in COMMANDS.items():
        sub = subparsers.add_parser(
            name, help=summary, description=summary[0].upper() + summary[1:] + ".",
            epilog="example" + ("s" if len(examples) > 1 else "") + ":\n"
            + "\n".join(f"  {example}" for example in examples),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_arguments(name, sub)
        if name != "completion":
            _common(sub, suppress=True)
    # what the completion scripts ask: the slugs of the agents, or the agents' names
    hidden = subparsers.add_parser("_complete")
    hidden.add_argument("what", choices=("slugs", "agents"))
    _common(hidden, suppress=True)
    return parser


#: The function that runs each command.
HANDLERS: dict[str, Handler] = {
    "ls": commands.ls, "status": commands.status, "create": commands.create,
    "rm": commands.control, "start": commands.control, "stop": commands.control,
    "restart": commands.control, "signal": commands.signal, "upload": commands.upload,
    "tokens": commands.tokens, "version": commands.version, "logs": follow.logs,
    "attach": follow.attach, "events": follow.events, "deploy": deploy.deploy,
    "scale": deploy.scale, "top": top.top, "plan": apply.plan, "apply": apply.apply,
}


def targets_of(args: argparse.Namespace) -> list[Target]:
    """The agents the command talks to (flags, environment, config file)."""
    path = Path(args.config) if args.config else config_path(os.environ)
    config = load_config(path, required=args.config is not None)
    return select(args.agent, args.all, os.environ, config)


async def run(args: argparse.Namespace, targets: list[Target], term: Terminal) -> int:
    """Run the parsed command against ``targets``."""
    clients = [AgentClient(t.url, token=t.token, name=t.name, timeout=args.timeout)
               for t in targets]
    async with Fleet(clients) as fleet:
        return await HANDLERS[args.command](args, fleet, term)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``smartmob`` with ``argv`` (the process's arguments by default); return the
    exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help, --version, or a usage error (status 2)
        return int(exit.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE
    term = Terminal(json_output=args.json)
    if args.command == "completion":
        term.out.write(completion.script(args.shell, parser))
        return OK
    try:
        if args.command == "_complete":
            return _complete(args, term)
        return asyncio.run(run(args, targets_of(args), term))
    except UsageError as error:
        term.error(str(error))
        return USAGE
    except ClientError as error:  # a call outside the fleet's own catching
        term.error(str(error))
        return exit_status(error)
    except KeyboardInterrupt:
        follows = args.command in FOLLOWING or getattr(args, "follow", False)
        return OK if follows else 130


def _complete(args: argparse.Namespace, term: Terminal) -> int:
    """The words a completion script offers: agent names, or slugs (asked for with a
    short timeout and no retries; nothing when no agent answers)."""
    path = Path(args.config) if args.config else config_path(os.environ)
    if args.what == "agents":
        term.lines(agent.name for agent in load_config(path).agents)
        return OK

    async def slugs() -> list[str]:
        clients = [AgentClient(t.url, token=t.token, name=t.name, timeout=1.0, retries=0)
                   for t in targets_of(args)]
        async with Fleet(clients) as fleet:
            return sorted({p.slug for listing in (await fleet.list()).values
                           for p in listing})

    term.lines(asyncio.run(slugs()))
    return OK


if __name__ == "__main__":
    sys.exit(main())
