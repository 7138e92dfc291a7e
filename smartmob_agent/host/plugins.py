"""Extra sections of the host statistics snapshot, from plugins.

A plugin is a function registered under the entry point group :data:`GROUP`
(``smartmob_agent.host_stats``) of any installed package: it takes a
:class:`~smartmob_agent.host.shape.HostContext` and returns a JSON-able dict, shown in
the snapshot's ``plugins`` under the entry point's name. A plugin that cannot be loaded,
raises, or returns something that is not a JSON object gets ``{"error": "<why>"}`` as its
section instead; the rest of the snapshot is not touched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from smartmob_agent.host.shape import HostContext

log = logging.getLogger("smartmob_agent.host")  # stable name: internals.rst

#: The entry point group plugins register in.
GROUP = "smartmob_agent.host_stats"


Plugin = Callable[[HostContext], Mapping[str, Any]]


def _unloadable(why: str) -> Plugin:
    def plugin(context: HostContext) -> Mapping[str, Any]:
        raise RuntimeError(why)
    return plugin


class Plugins:
    """The plugins of one agent, loaded once, run for each snapshot."""

    def __init__(self, plugins: Iterable[tuple[str, Plugin]]) -> None:
        self._plugins = dict(plugins)
        #: plugins whose failure was logged already (one record each, not one per push)
        self._logged: set[str] = set()

    @classmethod
    def installed(cls, group: str = GROUP) -> Plugins:
        """The plugins of every installed package's entry points of ``group``.

        An entry point that cannot be loaded is kept as a plugin that always fails with
        the reason, so that the snapshot says it, where a person looks.
        """
        # imported here: importlib.metadata costs memory an agent nobody asks for stats
        # from does not spend
        from importlib.metadata import entry_points

        loaded: list[tuple[str, Plugin]] = []
        for entry in sorted(entry_points(group=group), key=lambda entry: entry.name):
            try:
                function = entry.load()
            except Exception as error:  # an installed package's bug: say it, go on
                function = _unloadable(f"cannot load {entry.value}: {error!r}")
            if not callable(function):
                function = _unloadable(f"{entry.value} is not a function")
            loaded.append((entry.name, function))
        return cls(loaded)

    @property
    def names(self) -> list[str]:
        """The name of each plugin, in the order they are run."""
        return list(self._plugins)

    def run(self, context: HostContext) -> dict[str, dict[str, Any]]:
        """Each plugin's section, by name: what it returned, or ``{"error": why}``."""
        return {name: self._section(name, plugin, context)
                for name, plugin in self._plugins.items()}

    def _section(self, name: str, plugin: Plugin, context: HostContext) -> dict[str, Any]:
        try:
            section = plugin(context)
            if not isinstance(section, Mapping):
                raise TypeError(f"returned a {type(section).__name__}, not a dict")
            # round trip: the section must survive as JSON (no sets, no objects, no NaN)
            checked: dict[str, Any] = json.loads(json.dumps(dict(section), allow_nan=False))
        except Exception as error:  # a plugin's bug is its section's, not the snapshot's
            if name not in self._logged:
                self._logged.add(name)
                log.warning("host statistics plugin %s failed", name, exc_info=True)
            return {"error": f"the plugin failed: {type(error).__name__}: {error}"}
        return checked
