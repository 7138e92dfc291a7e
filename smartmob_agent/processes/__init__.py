"""Operating-system processes: spawning children, reaping them, stopping trees, the
guardian, ports and the resource monitor."""
