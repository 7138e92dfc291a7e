"""Supervision: the agent (the registry of watchers), each process's lifecycle, restart
policy and health checks."""
