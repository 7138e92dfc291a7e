"""``python -m smartmob_agent`` runs the agent, like the ``smartmob-agent`` command."""

from smartmob_agent.cli import main

if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess
    raise SystemExit(main())
