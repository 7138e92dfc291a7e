"""``smartmob.toml`` and the plan of ``smartmob apply``, as pure functions: the file's
format and its errors, nodes spread over agents, and what is created, updated,
replaced, deleted or left alone."""

from __future__ import annotations

import pytest

from smartmob_agent.client.manifest import ManifestError, parse_manifest
from smartmob_agent.client.plan import (
    Desired,
    Observed,
    Source,
    compute,
    counts,
    options_changed,
    place,
)

FULL = """
[apps.shop]
source = "./shop"
agents = ["a", "b", "a"]
env = { GREETING = "hi", MODE = "app" }
options = { stop_timeout = 5, restart = "always" }
health = { http = "/health" }
socket = true

[apps.shop.formation]
web = 2

[apps.shop.formation.worker]
count = 1
env = { MODE = "worker" }
health = false
socket = false
options = { restart = "on-failure" }

[apps.feed]
source = "https://example.com/feed.tgz"
checksum = "sha256:%s"
formation = { clock = 1 }

[apps.gone]
formation = {}
""" % ("ab" * 32)


def test_a_full_file() -> None:
    """Every key: per-app env and options (with the health and socket shortcuts), and
    per-type ones on top; a type's false removes the app's health or socket."""
    shop, feed, gone = parse_manifest(FULL, "f.toml").apps
    assert (shop.name, shop.source, shop.is_url, shop.agents) == (
        "shop", "./shop", False, ("a", "b"))
    web, worker = shop.types
    assert (web.process_type, web.count, dict(web.env)) == (
        "web", 2, {"GREETING": "hi", "MODE": "app"})
    assert dict(web.options) == {"stop_timeout": 5, "restart": "always",
                                 "health": {"http": "/health"}, "socket": True}
    assert dict(worker.env) == {"GREETING": "hi", "MODE": "worker"}
    assert dict(worker.options) == {"stop_timeout": 5, "restart": "on-failure"}
    assert (feed.is_url, feed.checksum, feed.agents) == (True, "sha256:" + "ab" * 32, ())
    assert (gone.source, gone.types) == (None, ())


@pytest.mark.parametrize(("text", "error"), [
    ("apps = 1", "f.toml names no app: add an [apps.NAME] table"),
    ("[app.shop]", "f.toml: unknown key 'app' (the file has one table, [apps.NAME], per app)"),
    ("[apps.shop]\nsoruce = 'x'", "f.toml: app 'shop': unknown key 'soruce' (known: "
     "source, checksum, agents, env, options, health, socket, formation)"),
    ("[apps.'a.b']\nsource = 'x'", "f.toml: app 'a.b': an app's name is 1 to 64 letters, "
     "digits, '_' or '-', not starting with '-'"),
    ("[apps.shop]\nformation = { web = 1 }",
     "f.toml: app 'shop' needs a source: a folder or an archive's URL"),
    ("[apps.shop]\nsource = 'x'\nformation = { web = 101 }",
     "f.toml: app 'shop': formation.web must be a count from 0 to 100, or a table with a "
     "count"),
    ("[apps.shop]\nsource = 'x'\nformation = { web = { cuont = 1 } }",
     "f.toml: app 'shop': formation.web: unknown key 'cuont' (known: count, env, options, "
     "health, socket)"),
    ("[apps.shop]\nsource = 'x'\nenv = { A = 1 }", "f.toml: app 'shop': env.A must be a "
     "string, and its name letters, digits and '_', not starting with a digit"),
    ("[apps.shop]\nsource = 'x'\nchecksum = 'sha256:00'", "f.toml: app 'shop': checksum "
     "must be 'sha256:' and 64 hexadecimal digits"),
    ("[apps.shop]\nsource = 'x'\nchecksum = 'sha256:%s'" % ("0" * 64), "f.toml: app "
     "'shop': a checksum goes with a URL source (a folder's is computed)"),
    ("[apps.shop]\nsource = 'x'\nagents = 'a'",
     "f.toml: app 'shop': agents must be a list of agent names or URLs"),
    ("[apps.shop\n", "f.toml is not valid TOML: "),
])
def test_wrong_files_say_what_and_where(text: str, error: str) -> None:
    with pytest.raises(ManifestError) as raised:
        parse_manifest(text, "f.toml")
    assert str(raised.value).startswith(error)


def test_nodes_are_spread_over_the_agents() -> None:
    """Node TYPE.i goes to agent i modulo their number: stable names, even shares."""
    app = parse_manifest('[apps.a]\nsource = "."\nformation = { web = 3, worker = 2 }'
                         ).apps[0]
    placed = place(app, ["x", "y"], Source(checksum="sha256:1"))
    assert [(d.agent, d.slug) for d in placed] == [
        ("x", "a.web.0"), ("y", "a.web.1"), ("x", "a.web.2"), ("x", "a.worker.0"),
        ("y", "a.worker.1")]
    assert [(d.agent, d.node) for d in place(app, ["x"], Source())][:2] == [
        ("x", "web.0"), ("x", "web.1")]
    with pytest.raises(ValueError, match="at least one agent"):
        place(app, [], Source())


NEW = Source("http://x/new.tgz", "sha256:new")
OLD = Source("http://x/old.tgz", "sha256:old")


def want(agent: str, node: str, source: Source = NEW, **options: object) -> Desired:
    return Desired(agent, "shop", node, node.split(".")[0], source, {"A": "1"}, options)


def have(node: str, source: Source = NEW, app: str = "shop", kind: str | None = None,
         **options: object) -> Observed:
    return Observed(app, node, kind or node.split(".")[0], source,
                    {"restart": "always", "stop_timeout": 10.0, "health": None, **options})


def test_the_plan_of_each_kind() -> None:
    """Missing nodes are created, changed ones updated (the plan says what changed), a
    node of another type replaced, extra ones deleted, the same ones left alone; other
    apps are never looked at, and each agent is compared with its own nodes."""
    desired = [want("x", "web.0"), want("y", "web.1"), want("x", "web.2", stop_timeout=5),
               want("x", "worker.0"), want("x", "clock.0")]
    observed = {
        "x": [have("web.0"), have("web.2"), have("worker.0", OLD),
              have("clock.0", kind="web"), have("web.3"), have("web.0", app="other")],
        "y": [have("web.0")],
    }
    plan = compute(desired, observed, ["shop"])
    assert [(a.kind, a.agent, a.slug, a.why) for a in plan] == [
        ("create", "y", "shop.web.1", ()),
        ("replace", "x", "shop.clock.0", ("type web -> clock",)),
        ("update", "x", "shop.web.2", ("options: stop_timeout",)),
        ("update", "x", "shop.worker.0", ("source sha256:old -> sha256:new",)),
        ("delete", "y", "shop.web.0", ("not in the file",)),
        ("delete", "x", "shop.web.3", ("not in the file",)),
        ("unchanged", "x", "shop.web.0", ()),
    ]
    assert counts(plan) == {"create": 1, "replace": 1, "update": 2, "delete": 2,
                            "unchanged": 1}
    assert plan[0].desired == desired[1]
    assert plan[4].desired is None
    shuffled = {agent: list(reversed(listed)) for agent, listed in observed.items()}
    assert compute(reversed(desired), shuffled, ["shop"]) == plan


def test_update_all_and_what_cannot_be_compared() -> None:
    """--update-all updates the unchanged nodes (the environment is not shown); a source
    known by URL only is compared by URL; unknown sources, and options the agent does
    not show, are not compared."""
    desired = [want("x", "web.0"), want("x", "web.1", Source("http://x/new.tgz")),
               want("x", "web.2", Source()), want("x", "web.3", socket=True)]
    observed = {"x": [have("web.0"), have("web.1", Source("http://x/old.tgz")),
                      have("web.2", OLD), have("web.3")]}
    assert [(a.kind, a.why) for a in compute(desired, observed, ["shop"])] == [
        ("update", ("source http://x/old.tgz -> http://x/new.tgz",)),
        ("unchanged", ()), ("unchanged", ()), ("unchanged", ())]
    every = compute(desired, observed, ["shop"], update_all=True)
    assert [(a.node, a.kind, a.why) for a in every] == [
        ("web.0", "update", ("--update-all",)),
        ("web.1", "update", ("source http://x/old.tgz -> http://x/new.tgz",)),
        ("web.2", "update", ("--update-all",)), ("web.3", "update", ("--update-all",))]


@pytest.mark.parametrize(("wanted", "shown", "changed"), [
    ({"stop_timeout": 5}, {"stop_timeout": 5.0}, []),
    ({"stop_timeout": 5}, {"stop_timeout": 6.0}, ["stop_timeout"]),
    ({"umask": "22"}, {"umask": "0022"}, []),
    ({"umask": "077"}, {"umask": "0022"}, ["umask"]),
    ({"exit_codes": [2, 0]}, {"exit_codes": [0, 2]}, []),
    ({"health": {"http": "/"}}, {"health": {"http": "/", "interval": 10.0}}, []),
    ({"health": {"http": "/x"}}, {"health": {"http": "/", "interval": 10.0}}, ["health"]),
    ({"health": {"http": "/"}}, {"health": None}, ["health"]),
    ({"autostart": True}, {"autostart": 1}, ["autostart"]),
    ({"max_restarts": None}, {"max_restarts": 3}, ["max_restarts"]),
    ({"socket": True}, {}, []),
    ({"socket": True}, {"socket": {"port": 41234, "host": "127.0.0.1", "backlog": 128}}, []),
    ({"socket": True}, {"socket": None}, ["socket"]),
    ({"socket": {"port": 8000}}, {"socket": {"port": 8000, "host": "127.0.0.1"}}, []),
    ({"socket": {"port": 8001}}, {"socket": {"port": 8000, "host": "127.0.0.1"}},
     ["socket"]),
])
def test_options_are_compared_by_value(wanted: dict[str, object], shown: dict[str, object],
                                       changed: list[str]) -> None:
    assert options_changed(wanted, shown) == changed
    assert options_changed(wanted, None) == []
