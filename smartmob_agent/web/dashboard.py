"""The dashboard: a web page for one agent or several, served at ``/ui/``.

The page is plain HTML, CSS and JavaScript modules in the ``ui`` folder next to this
module, shipped in the package (``package_data``) and served as they are: no build step,
and nothing loaded from elsewhere. It holds no secret, so it is open without a key (the
user gives each agent's key to the page, which presents it as any client does).

Only the files the folder held when the application was made are served, by their name:
a request can name nothing else (no ``..``, no folder), whatever it spells.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

#: The folder of the dashboard's files.
UI_FOLDER = Path(__file__).with_name("ui")
#: The content type of each kind of file the folder holds.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
#: What the page may load and connect to: its own files only, but the API of any agent
#: the user adds (another origin, which must allow this one: ``--allow-origin``).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self' http: https: ws: wss:; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)
#: Sent with every file: a browser asks again each time (an upgraded agent serves new
#: files at once), and the agent answers 304 while a file is unchanged.
HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

#: The dashboard's routes; :func:`smartmob_agent.web.server.make_app` registers them.
routes = web.RouteTableDef()

FILES_KEY = web.AppKey("dashboard_files", dict[str, Path])


def served_files(folder: Path = UI_FOLDER) -> dict[str, Path]:
    """The files of ``folder`` the dashboard serves, by name: those of a known kind."""
    return {
        path.name: path for path in sorted(folder.iterdir())
        if path.is_file() and path.suffix in CONTENT_TYPES
    }


def _answer(path: Path) -> web.FileResponse:
    response = web.FileResponse(path, headers=HEADERS)
    kind, _, charset = CONTENT_TYPES[path.suffix].partition("; charset=")
    response.content_type = kind
    if charset:
        response.charset = charset
    return response


@routes.get("/ui/", name="dashboard")
async def page(request: web.Request) -> web.FileResponse:
    """The dashboard's page."""
    return _answer(request.app[FILES_KEY]["index.html"])


@routes.get("/ui/{name}", name="dashboard_file")
async def asset(request: web.Request) -> web.FileResponse:
    """One of the page's files (script, style, image), by its name."""
    path = request.app[FILES_KEY].get(request.match_info["name"])
    if path is None:
        raise web.HTTPNotFound()
    return _answer(path)
