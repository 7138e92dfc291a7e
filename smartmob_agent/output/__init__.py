"""Output of children: splitting bytes into lines, the per-process fan-out hub and the log files."""
