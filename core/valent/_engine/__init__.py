"""The dispatch engine: the dispatcher thread, its live view of runs, the final-status rule,
and the one place that decides which executor runs a node. Internal: use ``valent``."""
