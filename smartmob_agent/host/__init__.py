"""Host statistics: what the machine the agent runs on is doing (CPU, memory, load, disk,
network), as one JSON snapshot, plus the sections plugins add.

:mod:`~smartmob_agent.host.control` (the interval rules and the messages of the
``host-stats`` WebSocket) and :mod:`~smartmob_agent.host.shape` (the snapshot document)
are pure; :mod:`~smartmob_agent.host.gather` reads the machine with ``psutil``, imported
there only, and only once a snapshot is asked for; :mod:`~smartmob_agent.host.plugins`
loads the ``smartmob_agent.host_stats`` entry points; :mod:`~smartmob_agent.host.sections`
is the plugin that ships with the agent.
"""
