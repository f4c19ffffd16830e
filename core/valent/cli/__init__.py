"""The ``valent`` command line: ``valent demo``, dispatch inspection and control, plugins."""

from __future__ import annotations

import click

from .. import __version__
from .format import Seconds


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="valent")
def cli() -> None:
    """valent: run Python workflows on pluggable executors, and stop them for real."""


@cli.command()
@click.option("--scale", type=Seconds(0.01, 10, "factor"), default=0.2, show_default=True,
              help="Multiply the example's sleeps (1.0 = Covalent's original timings).")
def demo(scale: float) -> None:
    """Run Covalent's "cancel a running workflow" example, cancel it, show what stopped."""
    from .demo import run_demo

    run_demo(scale)


def _register_commands() -> None:
    from . import dispatches, plugins

    dispatches.register(cli)
    plugins.register(cli)
    from ..ui.command import ui_cmd

    cli.add_command(ui_cmd)


_register_commands()


def main() -> None:
    """Entry point of the ``valent`` script."""
    cli()


if __name__ == "__main__":
    main()
