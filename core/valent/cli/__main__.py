"""``python -m valent.cli``: the ``valent`` command."""

from . import main

main()
