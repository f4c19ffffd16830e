"""The process helpers every test module uses, importable by name from any of them.

They live in :mod:`valent.testing.procs` (public: a plugin author's tests make the same
checks). (``from conftest import ...`` is ambiguous once tests/ssh and tests/dask have their
own conftest.py: whichever was imported last answers.)
"""

from valent.testing.procs import (  # noqa: F401
    alive,
    live_descendants,
    pgid,
    read_pid,
    read_pids,
    wait_gone,
    wait_until,
    write_atomic,
)
