"""The dashboard at ``/ui/``: its files as the agent serves them, then the page itself in
a real headless Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright) against
the real ``smartmob-agent`` command running real processes.

The browser tests skip where Chromium or Playwright is missing (a laptop), but fail under
``CI=true``: ``.ci/run`` installs Chromium, so CI must never skip them. Each state the
tests reach is saved as a screenshot in a ``dashboard-screens`` folder of pytest's
temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from aiohttp.test_utils import TestClient

from smartmob_agent.config import Settings
from smartmob_agent.web.dashboard import CONTENT_TYPES, UI_FOLDER, served_files
from smartmob_agent.web.server import make_app
from tests.agent_process import AgentProcess
from tests.helpers import app_archive

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = Path("/usr/bin/chromium")
KEY = "dashboard-admin-key-0123456789"
OTHER_KEY = "dashboard-other-key-0123456789"
T = TypeVar("T")

# --- the files, as the agent serves them (no browser) -----------------------------------


async def test_the_page_and_its_files_are_served_without_a_key(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """``/ui/`` is the page and ``/ui/<name>`` each of its files, with their content type,
    open on an agent with keys (the page asks for the key itself), never cached unchecked,
    and under a policy that loads nothing from elsewhere."""
    settings = Settings(state_dir=tmp_path, token=(KEY,))
    client: TestClient[Any, Any] = await aiohttp_client(make_app(settings))
    page = await client.get("/ui/")
    assert page.status == 200
    assert page.content_type == "text/html"
    assert '<script type="module" src="app.js">' in await page.text()
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy
    assert "script-src 'self'" in policy
    assert page.headers["Cache-Control"] == "no-cache"
    for name, path in served_files().items():
        answer = await client.get(f"/ui/{name}")
        assert answer.status == 200, name
        assert answer.content_type == CONTENT_TYPES[path.suffix].split(";")[0], name
        assert await answer.read() == path.read_bytes(), name
    assert {"index.html", "app.js", "agent.js", "style.css"} <= set(served_files())
    assert (await client.get("/")).status == 401  # the API itself still needs the key


async def test_only_the_files_of_the_folder_are_served(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """A name the folder does not hold, or one that tries to leave it, is a JSON 404."""
    client: TestClient[Any, Any] = await aiohttp_client(make_app(Settings(state_dir=tmp_path)))
    for path in ("/ui/nothing.js", "/ui/..%2Fdashboard.py", "/ui/%2E%2E/server.py",
                 "/ui/__init__.py"):
        answer = await client.get(path)
        assert answer.status == 404, path
        assert "there is nothing at" in (await answer.json())["error"]


async def test_the_index_links_to_the_dashboard(aiohttp_client: Any, tmp_path: Path) -> None:
    """The index's ``dashboard`` link is the page's absolute URL."""
    client: TestClient[Any, Any] = await aiohttp_client(make_app(Settings(state_dir=tmp_path)))
    index = await (await client.get("/")).json()
    assert index["dashboard"] == str(client.server.make_url("/ui/"))


def test_the_package_ships_every_file_of_the_folder() -> None:
    """Every file of the folder is of a kind the agent serves (none is left out)."""
    assert sorted(path.name for path in UI_FOLDER.iterdir()) == sorted(served_files())


# --- the page in Chromium ---------------------------------------------------------------


def _browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return (f"Chromium is not installed ({CHROMIUM}: apt-get install chromium "
                "chromium-driver; .ci/run does)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install '.[test]')"
    return None


class Loop:
    """An event loop in a thread of its own, for the agents of the module: the browser is
    driven synchronously from the tests' thread, the agents' subprocesses from here."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coroutine`` on the loop; return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


WEB_APP = """\
import sys, threading, time
print("hello from web", flush=True)
def tick():
    n = 0
    while True:
        n += 1
        print(f"tick {n}", flush=True)
        time.sleep(0.4)
threading.Thread(target=tick, daemon=True).start()
for line in sys.stdin:
    print(f"echo: {line.strip()}", flush=True)
time.sleep(3600)
"""
CRASH_APP = """\
import sys
print("boom: cannot read config.ini", flush=True)
sys.exit(3)
"""
PROCFILE = "web: {PYTHON} -u web.py\ncrash: {PYTHON} -u crash.py\n"


def http(method: str, url: str, key: str, body: bytes | None = None) -> Any:
    """One request to an agent with ``key``; the JSON answer."""
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=20) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as error:
        with error:
            raise AssertionError(f"{method} {url}: {error.code} {error.read()!r}") from None


@dataclass
class Agents:
    """The live agents of the module: ``home`` serves the page, ``other`` is a second one."""

    home: AgentProcess
    other: AgentProcess
    source_url: str
    screens: Path


def _start(loop: Loop, state: Path, key: str, *args: str) -> AgentProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMARTMOB_")}
    agent = AgentProcess(state, ["--token", key, "--monitor-interval", "0.5", *args], env=env)
    return loop.run(agent.start(timeout=30))


def _stop(loop: Loop, agent: AgentProcess) -> None:
    if agent.proc is not None and agent.proc.returncode is None:
        agent.proc.terminate()
    loop.run(agent.wait(30), timeout=40)


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    """Two real agents with keys; the first runs ``shop web.0`` (prints, echoes its stdin)
    and ``shop crash.0`` (a crash loop); the second ``tools web.0``."""
    missing = _browser_missing()
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}: CI=true, so the browser tests must run, not skip")
        pytest.skip(missing)
    base = tmp_path_factory.mktemp("dashboard")
    loop = Loop()
    home = _start(loop, base / "home", KEY)
    other = _start(loop, base / "other", OTHER_KEY, "--allow-origin", home.url)
    try:
        archive = app_archive(PROCFILE, {"web.py": WEB_APP, "crash.py": CRASH_APP})
        index = http("GET", home.url + "/", KEY)
        source = http("POST", index["upload"], KEY, archive)["source_url"]
        for node, kind in (("web.0", "web"), ("crash.0", "crash")):
            http("POST", index["create"], KEY, json.dumps({
                "app": "shop", "node": node, "process_type": kind, "source_url": source,
                "backoff": {"initial": 2, "max": 30},
            }).encode())
        other_index = http("GET", other.url + "/", OTHER_KEY)
        other_source = http("POST", other_index["upload"], OTHER_KEY, archive)["source_url"]
        http("POST", other_index["create"], OTHER_KEY, json.dumps({
            "app": "tools", "node": "web.0", "process_type": "web",
            "source_url": other_source,
        }).encode())
        yield Agents(home, other, source, base / "dashboard-screens")
    finally:
        for agent in (home, other):
            _stop(loop, agent)
        loop.close()


@pytest.fixture(scope="module")
def browser(agents: Agents) -> Iterator[Browser]:
    """One headless Chromium for the module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"],
        )
        try:
            yield chromium
        finally:
            chromium.close()


def _keys_script(keys: dict[str, str]) -> str:
    """A script that puts agents and their keys in the page's storage before it runs."""
    entries = [{"url": url + "/", "key": key} for url, key in keys.items()]
    return (
        "if (!sessionStorage.getItem('seeded')) {"
        f"  localStorage.setItem('smartmob-dashboard.agents', {json.dumps(json.dumps(entries))});"
        "  sessionStorage.setItem('seeded', '1');"
        "}"
    )


@pytest.fixture
def page(browser: Browser, agents: Agents) -> Iterator[Page]:
    """A fresh page (its own storage) that knows the key of the home agent."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.add_init_script(_keys_script({agents.home.url: KEY}))
    page = context.new_page()
    page.set_default_timeout(15_000)
    failures: list[str] = []  # the page's uncaught JavaScript errors: bugs of the page
    page.on("pageerror", lambda error: failures.append(str(error)))
    try:
        page.goto(agents.home.url + "/ui/")
        yield page
    finally:
        context.close()
    assert not failures, failures


def shot(page: Page, agents: Agents, name: str) -> Path:
    """Save a screenshot of the page as ``<name>.png``; return its path."""
    agents.screens.mkdir(exist_ok=True)
    path = agents.screens / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def samples_reach(page: Page, chart: str, count: int) -> None:
    """Wait until the visible agent's chart ``chart`` has drawn ``count`` snapshots."""
    page.wait_for_function(
        """([chart, count]) => {
            const figure = document.querySelector(
                `section.agent:not([hidden]) figure.chart.${chart}`);
            return figure !== null && Number(figure.dataset.samples || 0) >= count;
        }""", arg=[chart, count], timeout=20_000)


def row(page: Page, slug: str) -> Any:
    """The table row of process ``slug`` on the visible agent."""
    return page.locator(f"section.agent:visible tr.process[data-slug='{slug}']")


def test_a_process_turns_running_and_restart_changes_its_pid(page: Page, agents: Agents) -> None:
    """The table shows the process ``running`` with its pid; Stop and Restart ask first
    (a refusal does nothing); a confirmed restart shows the new child's pid."""
    from playwright.sync_api import expect

    web = row(page, "shop.web.0")
    expect(web.locator(".state")).to_have_text("running")
    expect(web.locator(".pid")).not_to_have_text("")
    expect(page.locator(".tab[data-status='connected']")).to_have_count(1)
    before = web.locator(".pid").inner_text()
    shot(page, agents, "1-running")
    web.locator("button.stop").click()
    page.locator("dialog#confirm button[value=no]").click()  # asked, and refused: no stop
    expect(page.locator("dialog#confirm")).to_be_hidden()
    expect(web.locator(".state")).to_have_text("running")
    expect(web.locator(".pid")).to_have_text(before)
    web.locator("button.restart").click()
    dialog = page.locator("dialog#confirm")
    expect(dialog).to_be_visible()
    expect(dialog.locator(".question")).to_contain_text("Restart shop.web.0?")
    shot(page, agents, "2-confirm-restart")
    dialog.locator("button[value=yes]").click()
    expect(web.locator(".pid")).not_to_have_text(before)
    expect(web.locator(".state")).to_have_text("running")
    expect(web.locator(".pid")).not_to_have_text("")
    shot(page, agents, "3-restarted")


def test_a_crash_loop_shows_its_diagnosis_without_a_click(page: Page, agents: Agents) -> None:
    """A crash-looping process shows its last exits, its last lines and its next retry
    under its row."""
    from playwright.sync_api import expect

    diagnosis = page.locator("section.agent:visible tr.diagnosis[data-slug='shop.crash.0']")
    expect(diagnosis).to_be_visible()
    expect(diagnosis).to_contain_text("boom: cannot read config.ini")
    expect(diagnosis).to_contain_text("exit 3")
    expect(diagnosis.locator(".retry")).to_contain_text("next retry")
    expect(row(page, "shop.crash.0").locator(".state")).to_have_text("backoff")
    shot(page, agents, "4-crash-loop")


def test_host_charts_update_at_the_interval_chosen(page: Page, agents: Agents) -> None:
    """The host-stats WebSocket feeds the charts (CPU per core, memory, swap, load); the
    interval picked is the one the agent then says is in force, and snapshots keep
    coming."""
    from playwright.sync_api import expect

    stats = page.locator("section.agent:visible .host-stats")
    cpu = stats.locator("figure.chart.cpu")
    samples_reach(page, "cpu", 1)
    stats.locator("select.interval").select_option("0.5")
    expect(stats).to_have_attribute("data-interval", "0.5")
    drawn = int(cpu.get_attribute("data-samples") or 0)
    samples_reach(page, "cpu", drawn + 2)
    for name in ("memory", "swap", "load"):
        assert int(stats.locator(f"figure.chart.{name}").get_attribute("data-samples") or 0) >= 3
    expect(cpu.locator(".legend")).to_contain_text("core 0")
    expect(stats.locator(".host")).to_contain_text("up ")
    shot(page, agents, "8-charts")


def test_figures_are_formatted_for_a_person(page: Page) -> None:
    """The page's pure formatting module, run in the browser: bytes, durations, exits."""
    result = page.evaluate("""async () => {
        const f = await import("./format.js");
        return [f.bytes(0), f.bytes(11431936), f.duration(59.9), f.duration(3725),
                f.duration(90061), f.exitText({code: 3, signal: null}),
                f.exitText({code: -9, signal: "SIGKILL"}), f.percent(null)];
    }""")
    assert result == ["0 B", "10.9 MiB", "59s", "1h 02m", "1d 1h", "exit 3", "SIGKILL", ""]


def test_live_lines_appear_and_a_line_reaches_stdin(page: Page, agents: Agents) -> None:
    """The log panel replays the last lines, follows new ones live, and sends a line to
    the process's stdin (which it echoes)."""
    from playwright.sync_api import expect

    row(page, "shop.web.0").locator("button.logs").click()
    panel = page.locator("section.agent:visible .logs")
    expect(panel.locator(".attach-state")).to_have_text("live")
    lines = panel.locator(".lines .line")
    expect(lines.first).to_be_visible()
    seen = lines.count()
    expect(lines).not_to_have_count(seen)  # a new tick came live
    panel.locator("input.stdin").fill("hello agent")
    panel.locator(".stdin-form button").click()
    expect(panel.locator(".lines")).to_contain_text("echo: hello agent")
    shot(page, agents, "5-logs")


def test_the_create_form_runs_a_new_process(page: Page, agents: Agents) -> None:
    """The create form posts to the index's ``create`` link; the new row turns running; a
    bad request shows the agent's sentence."""
    from playwright.sync_api import expect

    page.locator("section.agent:visible button.create-toggle").click()
    form = page.locator("section.agent:visible form.create")
    form.locator("input[name=app]").fill("shop")
    form.locator("input[name=node]").fill("web.0")
    form.locator("input[name=process_type]").fill("web")
    form.locator("input[name=source_url]").fill(agents.source_url)
    form.locator("button[type=submit]").click()
    expect(form.locator(".form-error")).to_contain_text("exists")  # 409: the slug is taken
    form.locator("input[name=node]").fill("web.1")
    form.locator("button[type=submit]").click()
    expect(form).to_be_hidden()
    expect(row(page, "shop.web.1").locator(".state")).to_have_text("running")
    row(page, "shop.web.1").locator("button.delete").click()
    page.locator("dialog#confirm button[value=yes]").click()
    expect(row(page, "shop.web.1")).to_have_count(0)


def test_a_second_agent_is_added_by_url_and_key(page: Page, agents: Agents) -> None:
    """Another agent (another origin, which allows this page's with ``--allow-origin``)
    gets a tab of its own: its processes, its output, its host charts; the page keeps it
    across a reload."""
    from playwright.sync_api import expect

    form = page.locator("#add-agent")
    form.locator("input[name=url]").fill(agents.other.url)
    form.locator("input[name=key]").fill(OTHER_KEY)
    form.locator("button[type=submit]").click()
    tab = page.locator(f".tab[data-url='{agents.other.url}/']")
    expect(tab).to_have_attribute("data-status", "connected")
    expect(tab).to_have_attribute("aria-selected", "true")
    tools = row(page, "tools.web.0")
    expect(tools.locator(".state")).to_have_text("running")
    expect(row(page, "shop.web.0")).to_have_count(0)  # the first agent's, on its own tab
    tools.locator("button.logs").click()
    expect(page.locator("section.agent:visible .logs .lines")).to_contain_text("tick")
    samples_reach(page, "cpu", 2)
    shot(page, agents, "9-two-agents")
    home = page.locator(".tab").first
    home.click()  # each tab keeps its own connections: the first agent's table is there
    expect(home).to_have_attribute("aria-selected", "true")
    expect(row(page, "shop.web.0").locator(".state")).to_have_text("running")
    row(page, "shop.web.0").locator("button.logs").click()
    expect(page.locator("section.agent:visible .logs .lines")).to_contain_text("tick")
    samples_reach(page, "cpu", 3)
    shot(page, agents, "10-overview")
    page.reload()  # the agents and their keys are kept in the browser
    expect(page.locator(".tab")).to_have_count(2)
    expect(page.locator(".tab[data-status='connected']")).to_have_count(2)


def test_another_agent_refusing_the_key_says_so(page: Page, agents: Agents) -> None:
    """A wrong key for another agent (another origin) is said as plainly as for the
    page's own: its answers carry CORS headers, so the page reads the refusal."""
    from playwright.sync_api import expect

    form = page.locator("#add-agent")
    form.locator("input[name=url]").fill(agents.other.url)
    form.locator("input[name=key]").fill("not-the-key")
    form.locator("button[type=submit]").click()
    banner = page.locator("section.agent:visible .banner.refused")
    expect(banner).to_contain_text(f"The agent at {agents.other.url} refused the key")


def test_a_wrong_key_shows_a_clear_message(browser: Browser, agents: Agents) -> None:
    """Without a key, or with a wrong one, the page says the agent refused it and asks for
    the key; the right key connects."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1400, "height": 700})
    try:
        page = context.new_page()
        page.goto(agents.home.url + "/ui/")
        banner = page.locator("section.agent .banner.refused")
        expect(banner).to_contain_text("refused the key")
        page.locator(".key-form input").fill("not-the-key")
        page.locator(".key-form button").click()
        expect(banner).to_contain_text("Enter the right key for this agent")
        expect(page.locator(".tab[data-status='refused']")).to_have_count(1)
        shot(page, agents, "6-wrong-key")
        page.locator(".key-form input").fill(KEY)
        page.locator(".key-form button").click()
        expect(row(page, "shop.web.0").locator(".state")).to_have_text("running")
    finally:
        context.close()


def test_an_agent_that_goes_away_shows_disconnected_and_comes_back(
    browser: Browser, agents: Agents, tmp_path: Path
) -> None:
    """An agent without keys serves the page to itself; stopped, its tab shows it
    disconnected; started again on its port, the page reconnects by itself."""
    from playwright.sync_api import expect

    loop = Loop()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMARTMOB_")}
    agent = loop.run(AgentProcess(tmp_path / "state", env=env).start(timeout=30))
    context = browser.new_context(viewport={"width": 1400, "height": 500})
    try:
        page = context.new_page()
        page.goto(agent.url + "/ui/")
        tab = page.locator(".tab").first
        expect(tab).to_have_attribute("data-status", "connected")
        expect(page.locator("tr.empty")).to_contain_text("No process")
        _stop(loop, agent)
        expect(tab).to_have_attribute("data-status", "disconnected")
        expect(page.locator(".banner.disconnected")).to_contain_text("Reconnecting")
        shot(page, agents, "7-disconnected")
        port = agent.url.rsplit(":", 1)[1]
        agent = loop.run(AgentProcess(tmp_path / "state", ["--port", port], env=env)
                         .start(timeout=30))
        expect(tab).to_have_attribute("data-status", "connected", timeout=30_000)
    finally:
        context.close()
        _stop(loop, agent)
        loop.close()


def test_the_page_works_behind_tls(browser: Browser, agents: Agents, tmp_path: Path) -> None:
    """Served over https, the page connects over https and wss (the agent's own links)."""
    import trustme
    from playwright.sync_api import expect

    certificate = trustme.CA().issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    certificate.private_key_pem.write_to_path(str(key_file))
    loop = Loop()
    agent = _start(loop, tmp_path / "state", KEY, "--tls-cert", str(cert_file),
                   "--tls-key", str(key_file))
    context = browser.new_context(viewport={"width": 1400, "height": 400},
                                  ignore_https_errors=True)
    try:
        assert agent.url.startswith("https://")
        context.add_init_script(_keys_script({agent.url: KEY}))
        page = context.new_page()
        page.goto(agent.url + "/ui/")
        expect(page.locator(".tab").first).to_have_attribute("data-status", "connected")
        expect(page.locator("tr.empty")).to_contain_text("No process")
    finally:
        context.close()
        _stop(loop, agent)
        loop.close()
