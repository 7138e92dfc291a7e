"""Host statistics (issue 18), the pure parts: the interval rules, the control messages of
the ``host-stats`` WebSocket, the snapshot document, and plugins that fail on their own."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from smartmob_agent.errors import InvalidRequest
from smartmob_agent.host.control import (
    MAX_INTERVAL,
    MIN_INTERVAL,
    Control,
    check_interval,
    interval_query,
    parse_control,
)
from smartmob_agent.host.plugins import GROUP, Plugins
from smartmob_agent.host.sections import process_types
from smartmob_agent.host.shape import (
    HostContext,
    HostSample,
    busy_percent,
    cpu_section,
    snapshot_document,
)
from smartmob_agent.model import ProcessInfo, ProcessState, Spec

#: Every field of a snapshot, and of each of its sections.
SNAPSHOT_FIELDS = {
    "hostname", "time", "boot_time", "uptime", "users", "load", "cpu", "memory", "swap",
    "disk", "network", "agent", "plugins",
}
SECTION_FIELDS = {
    "cpu": {"count", "percent", "per_core", "interval"},
    "memory": {"total", "used", "available", "cached", "percent"},
    "swap": {"total", "used", "free", "percent"},
    "disk": {"path", "total", "used", "free", "percent"},
    "network": {"bytes_in", "bytes_out"},
    "agent": {"pid", "rss", "cpu_percent", "processes", "states"},
}


# -- the interval rules ----------------------------------------------------------------------

@pytest.mark.parametrize("value", [0.5, 1, 2.5, 3600, 3600.0])
def test_an_interval_from_half_a_second_to_an_hour_is_accepted(value: float) -> None:
    """0.5 s and 3600 s are in; anything between too."""
    assert check_interval(value) == float(value)


@pytest.mark.parametrize("value", [0.49, 0, -1, 3600.01, math.nan, math.inf, 1e400])
def test_an_interval_out_of_the_rules_is_refused_with_the_bounds(value: float) -> None:
    """0.49 s is refused (below the minimum), and so is anything out of 0.5 .. 3600."""
    with pytest.raises(ValueError, match=r"from 0\.5 to 3600 seconds"):
        check_interval(value)


@pytest.mark.parametrize("value", [True, "2", None, [1], {"s": 1}])
def test_an_interval_that_is_not_a_number_is_refused(value: object) -> None:
    """A boolean, a string or a container is not a number of seconds."""
    with pytest.raises(ValueError, match="must be a number of seconds"):
        check_interval(value)


def test_the_bounds_are_those_of_the_issue() -> None:
    """Never below half a second, never above an hour."""
    assert (MIN_INTERVAL, MAX_INTERVAL) == (0.5, 3600.0)


@pytest.mark.parametrize(("values", "found"), [([], 2.0), (["0.5"], 0.5), (["3600"], 3600.0),
                                               (["1e1"], 10.0)])
def test_the_query_interval_is_read_with_a_default(values: list[str], found: float) -> None:
    """No ``interval`` gives the default; a number in the rules is taken."""
    assert interval_query(values) == found


@pytest.mark.parametrize(("values", "why"), [
    (["0.49"], "from 0.5 to 3600"), (["soon"], "number of seconds"), (["nan"], "0.5 to"),
    (["1", "2"], "at most once"), ([""], "number of seconds"),
])
def test_a_bad_query_interval_is_an_invalid_request_naming_it(
    values: list[str], why: str
) -> None:
    """A bad ``?interval=`` is a 400 naming the ``interval`` field and why."""
    with pytest.raises(InvalidRequest, match=why) as caught:
        interval_query(values)
    assert set(caught.value.fields) == {"interval"}


# -- control messages ------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "control"), [
    ('{"interval": 0.5}', Control(interval=0.5)),
    ('{"interval": 60}', Control(interval=60.0)),
    ('{"stop": true}', Control(paused=True)),
    ('{"start": true}', Control(paused=False)),
    ('{"start": true, "interval": 5}', Control(interval=5.0, paused=False)),
])
def test_a_control_message_is_read(text: str, control: Control) -> None:
    """``interval``, ``stop`` and ``start`` are read, alone or with an interval."""
    assert parse_control(text) == control


@pytest.mark.parametrize(("text", "why"), [
    ('{"interval": 0.49}', "from 0.5 to 3600"),
    ('{"interval": "2"}', "number of seconds"),
    ('{"stop": false}', '"stop" may only be true'),
    ('{"start": 1}', '"start" may only be true'),
    ('{"stop": true, "start": true}', "cannot go together"),
    ('{"pause": true}', "unknown key"),
    ("{}", "JSON object with"),
    ("[1]", "JSON object with"),
    ("stop", "must be a JSON object"),
    ('{"interval": NaN}', "from 0.5 to 3600"),
])
def test_a_bad_control_message_is_refused_with_a_sentence(text: str, why: str) -> None:
    """Each kind of bad message gets a reason a person can act on."""
    with pytest.raises(ValueError, match=why):
        parse_control(text)


# -- the snapshot ----------------------------------------------------------------------------

def sample(at: float, cores: tuple[tuple[float, float], ...], agent_cpu: float = 1.0
           ) -> HostSample:
    """A sample with the given clock, core times and agent CPU seconds."""
    return HostSample(
        hostname="host", at=1796148000.0 + at, monotonic=at, boot_time=1796140000.0,
        users=2, load=(0.5, 0.25, 0.125), cores=cores,
        memory={"total": 1000, "used": 250, "available": 700, "cached": 100},
        swap={"total": 0, "used": 0, "free": 0},
        disk={"path": "/state", "total": 200, "used": 50, "free": 150},
        network={"bytes_in": 10, "bytes_out": 20},
        agent_pid=42, agent_rss=4096, agent_cpu=agent_cpu,
    )


def info(app: str, node: str, state: ProcessState, **fields: Any) -> ProcessInfo:
    """A process snapshot of ``app``, process type ``web``."""
    spec = Spec(app=app, node=node, process_type=node.split(".")[0],
                source_url="http://127.0.0.1/a.tar.gz")
    values: dict[str, Any] = {"pid": None, "error": None, "restarts": 0, "last_exit": None}
    values.update(fields)
    return ProcessInfo(spec, state, **values)


def test_busy_percent_is_the_busy_share_between_two_samples() -> None:
    """A core busy 0.5 s of 2 s is 25 %; a core with no tick between samples is 0 %."""
    assert busy_percent((10.0, 100.0), (10.5, 102.0)) == 25.0
    assert busy_percent((1.0, 5.0), (1.0, 5.0)) == 0.0
    assert busy_percent((5.0, 10.0), (4.0, 9.0)) == 0.0  # counters that went back
    assert busy_percent((0.0, 0.0), (3.0, 2.0)) == 100.0  # rounding of a kernel: capped


def test_cpu_figures_are_measured_between_the_samples_not_since_boot() -> None:
    """Cores busy for most of their life but idle between the two samples show 0 %:
    the figures are those of the window, not of the whole uptime."""
    before = sample(10.0, ((900.0, 1000.0), (900.0, 1000.0)))
    after = sample(11.0, ((900.0, 1001.0), (901.0, 1002.0)))
    cpu = cpu_section(after, before)
    assert cpu == {"count": 2, "percent": 33.3, "per_core": [0.0, 50.0], "interval": 1.0}


def test_without_a_previous_sample_cpu_figures_are_null() -> None:
    """A rate needs two samples: the figures are null, not 0 (which would claim idle)."""
    cpu = cpu_section(sample(1.0, ((1.0, 2.0),)), None)
    assert cpu == {"count": 1, "percent": None, "per_core": None, "interval": None}


def test_a_core_going_offline_makes_the_figures_null_once() -> None:
    """Samples with different numbers of cores cannot be compared core by core."""
    before = sample(1.0, ((1.0, 2.0),))
    assert cpu_section(sample(2.0, ((1.0, 3.0), (0.0, 1.0))), before)["percent"] is None


def test_the_snapshot_has_every_field_of_the_issue() -> None:
    """Hostname, time, uptime, users, load, CPU, memory, swap, disk, network, the agent's
    figures and the plugins' sections are all there, with the documented keys."""
    processes = [info("shop", "web.0", ProcessState.RUNNING),
                 info("shop", "web.1", ProcessState.RUNNING),
                 info("blog", "worker.0", ProcessState.BACKOFF)]
    document = snapshot_document(
        sample(3.0, ((2.0, 4.0),), agent_cpu=1.5), sample(1.0, ((1.0, 2.0),)), processes,
        {"extra": {"answer": 42}},
    )
    assert set(document) == SNAPSHOT_FIELDS
    for section, fields in SECTION_FIELDS.items():
        assert set(document[section]) == fields, section
    assert document["time"] == "2026-12-01T18:00:03.000Z"
    assert document["uptime"] == 8003.0
    assert document["load"] == [0.5, 0.25, 0.125]
    assert document["memory"]["percent"] == 25.0
    assert document["swap"]["percent"] == 0.0  # no swap: 0, not a division by zero
    assert document["disk"]["percent"] == 25.0
    assert document["agent"] == {"pid": 42, "rss": 4096, "cpu_percent": 25.0,
                                 "processes": 3, "states": {"running": 2, "backoff": 1}}
    assert document["plugins"] == {"extra": {"answer": 42}}
    json.dumps(document, allow_nan=False)  # plain JSON


# -- plugins ---------------------------------------------------------------------------------

def context(*processes: ProcessInfo) -> HostContext:
    return HostContext(tuple(processes), Path("/state"))


def failing(context: HostContext) -> dict[str, Any]:
    raise ZeroDivisionError("division by zero")


def test_a_plugin_that_raises_is_reported_in_its_own_section() -> None:
    """The plugin's section says what it raised; the other plugins' are untouched."""
    plugins = Plugins([("good", lambda c: {"n": len(c.processes)}), ("bad", failing),
                       ("last", lambda c: {"ok": True})])
    sections = plugins.run(context(info("a", "web.0", ProcessState.RUNNING)))
    assert sections == {
        "good": {"n": 1},
        "bad": {"error": "the plugin failed: ZeroDivisionError: division by zero"},
        "last": {"ok": True},
    }


@pytest.mark.parametrize(("result", "why"), [
    ([1, 2], "returned a list, not a dict"),
    ({"s": {1, 2}}, "not JSON serializable"),
    ({"x": math.nan}, "Out of range float"),
])
def test_a_plugin_returning_no_json_object_is_reported(result: Any, why: str) -> None:
    """A section must be a JSON object: a list, a set or NaN is reported as the error."""
    section = Plugins([("odd", lambda c: result)]).run(context())["odd"]
    assert set(section) == {"error"}
    assert why in section["error"]


def test_a_plugin_failing_again_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A plugin failing at each push (every 0.5 s) leaves one log record, not thousands."""
    plugins = Plugins([("bad", failing)])
    for _ in range(3):
        plugins.run(context())
    records = [r for r in caplog.records if r.name == "smartmob_agent.host"]
    assert len(records) == 1
    assert "bad" in records[0].getMessage()


def test_installed_plugins_are_the_entry_points_of_the_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entry points of ``smartmob_agent.host_stats`` of any installed package are loaded:
    the shipped ``process_types``, and a package's that raises, and one whose module
    cannot be imported, each reported in its own section."""
    (tmp_path / "stats_plugin_fixture.py").write_text(
        "def hello(context):\n    return {'processes': len(context.processes)}\n"
        "def broken(context):\n    raise KeyError('gone')\n"
    )
    dist = tmp_path / "stats_plugin_fixture-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: stats-plugin-fixture\n"
                                   "Version: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{GROUP}]\nhello = stats_plugin_fixture:hello\n"
        "broken = stats_plugin_fixture:broken\nmissing = no_such_module_here:nothing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "stats_plugin_fixture", raising=False)
    plugins = Plugins.installed()
    assert {"process_types", "hello", "broken", "missing"} <= set(plugins.names)
    sections = plugins.run(context(info("a", "web.0", ProcessState.RUNNING)))
    assert sections["hello"] == {"processes": 1}
    assert sections["broken"] == {"error": "the plugin failed: KeyError: 'gone'"}
    assert "cannot load no_such_module_here:nothing" in sections["missing"]["error"]
    assert sections["process_types"]["types"][0]["app"] == "a"


def test_the_shipped_plugin_totals_each_process_type_of_each_app() -> None:
    """``process_types`` counts processes, running ones, restarts, CPU and memory per
    app and process type, sorted."""
    section = process_types(context(
        info("shop", "web.0", ProcessState.RUNNING, restarts=1, cpu_percent=10.0,
             memory_rss=100),
        info("shop", "web.1", ProcessState.BACKOFF, restarts=4),
        info("shop", "worker.0", ProcessState.RUNNING, cpu_percent=2.5, memory_rss=7),
        info("blog", "web.0", ProcessState.STOPPED),
    ))
    assert section == {"types": [
        {"app": "blog", "process_type": "web", "processes": 1, "running": 0,
         "restarts": 0, "cpu_percent": 0.0, "memory_rss": 0},
        {"app": "shop", "process_type": "web", "processes": 2, "running": 1,
         "restarts": 5, "cpu_percent": 10.0, "memory_rss": 100},
        {"app": "shop", "process_type": "worker", "processes": 1, "running": 1,
         "restarts": 0, "cpu_percent": 2.5, "memory_rss": 7},
    ]}
