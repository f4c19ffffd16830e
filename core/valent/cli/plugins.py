"""``valent plugins``: the installed executors, where they come from, what they can do."""

from __future__ import annotations

import inspect
import json
from typing import Any

import click

from ..errors import ValentError


def escape(text: str) -> str:
    """Escape rich markup (rich is imported only when the command runs)."""
    from rich.markup import escape as _escape

    return _escape(text)


def _default(p: inspect.Parameter) -> Any:
    return None if p.default is inspect.Parameter.empty else p.default


def collect() -> dict[str, Any]:
    """Everything ``valent plugins`` shows, as plain data (also its ``--json`` output)."""
    from .._plugins.manager import build_plugins
    from ..config import check_config, config_path, load_config

    plugins = build_plugins()  # fresh, and without the first-use warning: problems show here
    problems = list(plugins.problems)
    try:
        configured = load_config().get("executors", {})
    except ValentError:
        configured = {}
    # the same checks dispatch makes, for every table (not only the executors a graph uses)
    problems += check_config(plugins=plugins)
    executors = []
    for name, info in sorted(plugins.executors.items()):
        caps = info.cls.capabilities
        table = configured.get(name, {})
        settings = [
            {
                "name": key,
                "default": _default(p),
                "required": p.default is inspect.Parameter.empty,
                **({"configured": table[key]} if key in table else {}),
            }
            for key, p in info.cls.settings().items()
        ]
        executors.append(
            {
                "name": name,
                "class": f"{info.cls.__module__}.{info.cls.__qualname__}",
                "plugin": info.plugin,
                "distribution": info.distribution,
                "version": info.version,
                "cancel_pending": caps.cancel_pending,
                "stop_running": caps.stop_running,
                "kill_tree": caps.kill_tree,
                "grace": caps.grace,
                "chain": getattr(caps, "chain", False),
                "settings": settings,
            }
        )
    with_executors = {i.plugin for i in plugins.executors.values()}
    observers = [
        {"plugin": pname, "hooks": sorted(c.name for c in plugins.pm.get_hookcallers(obj) or [])}
        for pname, obj in plugins.pm.list_name_plugin()
        if obj is not None and pname not in with_executors and pname != "valent.defaults"
    ]
    return {
        "config": str(config_path()),
        "executors": executors,
        "observers": observers,
        "unavailable": dict(sorted(plugins.unavailable.items())),
        "problems": problems,
    }


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[yellow]no[/]"


def _settings_text(settings: list[dict[str, Any]]) -> str:
    parts = []
    for s in settings:
        value = "[red]required[/]" if s["required"] else escape(repr(s["default"]))
        text = f"{s['name']}={value}"
        if "configured" in s:
            text += f" [cyan]→ {escape(repr(s['configured']))} (config)[/]"
        parts.append(text)
    return ", ".join(parts) or "-"


def register(cli: click.Group) -> None:
    """Add ``valent plugins`` to the ``valent`` group."""

    @cli.command("plugins")
    @click.option("--json", "as_json", is_flag=True, help="Print the data as JSON.")
    def plugins_command(as_json: bool) -> None:
        """List installed executors: plugin, distribution, capabilities, settings; and problems.

        Executors come from the ``valent`` entry-point group. Settings are each executor's
        keyword arguments (with defaults), set per executor in the config file's
        ``[executors.NAME]`` table. A plugin that failed to load is listed under problems.
        """
        data = collect()
        if as_json:
            click.echo(json.dumps(data, indent=2, default=repr))
            return
        from rich.console import Console
        from rich.table import Table

        console = Console()
        table = Table(title="valent executors", title_justify="left", show_lines=True)
        table.add_column("executor", overflow="fold")
        table.add_column("plugin\ndistribution", overflow="fold")
        for col in ("cancel\npending", "stop\nrunning", "kill\ntree", "grace", "chain"):
            width = max(len(w) for w in col.split("\n"))
            table.add_column(col, justify="center", no_wrap=True, min_width=width)
        for e in data["executors"]:
            dist = f"{e['distribution']} {e['version']}" if e["distribution"] else "(no dist)"
            grace = "-" if e["grace"] is None else f"{e['grace']:g} s"
            table.add_row(
                f"[bold]{e['name']}[/]\n[dim]{escape(e['class'].rpartition('.')[2])}[/]",
                f"{escape(e['plugin'])}\n{escape(dist)}",
                _yes(e["cancel_pending"]),
                _yes(e["stop_running"]),
                _yes(e["kill_tree"]),
                grace,
                _yes(e["chain"]),
            )
        console.print(table)
        settings = Table(box=None, pad_edge=False, show_header=False)
        settings.add_column(no_wrap=True, style="bold")
        settings.add_column(ratio=1)
        for e in data["executors"]:
            settings.add_row(e["name"], _settings_text(e["settings"]))
        console.print(
            "\nSettings: keyword=default; set them in the config file's "
            + escape(f"[executors.NAME] table ({data['config']}).")
        )
        console.print(settings)
        for o in data["observers"]:
            console.print(f"observer plugin [bold]{escape(o['plugin'])}[/]: "
                          f"{escape(', '.join(o['hooks']))}")
        for name, why in data["unavailable"].items():
            if name not in {p for p in data["problems"]} and "disabled" in why:
                console.print(f"[yellow]disabled[/] {escape(name)}: {escape(why)}")
        if data["problems"]:
            console.print(f"[bold red]{len(data['problems'])} problem(s):[/]")
            for p in data["problems"]:
                console.print(f"  [red]•[/] {escape(p)}", soft_wrap=True)
