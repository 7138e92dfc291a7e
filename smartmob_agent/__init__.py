"""smartmob-agent: runs Procfile applications on request, over a hypermedia REST API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("smartmob-agent")
except PackageNotFoundError:  # pragma: no cover - only when run from a bare checkout
    __version__ = "0+unknown"

__all__ = ["__version__"]
