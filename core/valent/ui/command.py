"""``valent ui``: serve the live web view of the results store until Ctrl-C."""

from __future__ import annotations

import sys

import click


@click.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback exposes the UI to the network "
                   "(the token is still required).")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port (0: a free one).")
@click.option("--no-browser", is_flag=True, help="Do not open a web browser.")
@click.option("--read-only", is_flag=True, help="Hide the Cancel buttons and refuse cancels.")
def ui_cmd(host: str, port: int, no_browser: bool, read_only: bool) -> None:
    """A live web view of every dispatch in the results store: graph, node details and logs,
    timeline, and Cancel. Prints its URL (with a secret token) and opens a browser."""
    from ..config import results_dir
    from .server import UIServer, is_loopback

    folder = str(results_dir())
    try:
        server = UIServer(folder, host=host, port=port, read_only=read_only)
    except OSError as exc:
        click.echo(f"valent: error: cannot listen on {host}:{port}: {exc}; pick another "
                   "--port (0 picks a free one)", err=True)
        sys.exit(1)
    if not is_loopback(host.strip("[]")):
        click.echo(f"valent ui: WARNING: listening on {host}, reachable from other machines; "
                   "anyone with the URL's token can see outputs"
                   f"{'' if read_only else ' and cancel dispatches'}. Traffic is not "
                   "encrypted.", err=True)
    click.echo(f"valent ui: serving {folder}{' (read-only)' if read_only else ''}")
    click.echo(f"valent ui: open {server.url}")
    click.echo("valent ui: Ctrl-C stops the server (dispatches go on)")
    sys.stdout.flush()
    if not no_browser:
        import webbrowser

        try:
            webbrowser.open(server.url)
        except Exception:
            pass
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        click.echo("\nvalent ui: stopped", err=True)
    finally:
        server.server_close()
