"""smartmob-agent: runs Procfile applications on request, over a hypermedia REST API."""

# A literal, read by setup.cfg (``attr:``): importlib.metadata would cost every process
# importing the package (the guardian included) a few megabytes and tens of milliseconds.
__version__ = "0.1.0"

__all__ = ["__version__"]
