"""``valent list | status | show | cancel | watch | logs | redispatch | triggers``: look at
and control dispatches.

Every command reads the results store (``VALENT_RESULTS_DIR``), so it works from any process
on the machine, whoever dispatched. A dispatch id may be shortened to a unique prefix (at
least 4 characters). Errors are one line on stderr: exit 1 for an unknown id, an ambiguous
prefix or a store that cannot be opened; ``cancel`` exits 3 when the stop is not confirmed
within ``--timeout``; ``watch`` exits 130 on Ctrl-C (the dispatch goes on).
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import click

from ..errors import ValentError
from ..status import FINAL_VALUES, Status
from . import format as fmt
from .progress import make_bar, node_counts, update_bar

_ALL_STATUSES = [s.value for s in Status]
EXIT_ERROR = 1
EXIT_CANCEL_TIMEOUT = 3
EXIT_INTERRUPTED = 130


class _Fail(Exception):
    """A one-line error for the user, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


def _errors(fn: Callable[..., None]) -> Callable[..., None]:
    """Turn valent, store and expected errors into one line on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except _Fail as exc:
            click.echo(f"valent: {fmt.one_line(str(exc))}", err=True)
            sys.exit(exc.code)
        except ValentError as exc:
            click.echo(f"valent: error: {fmt.one_line(str(exc))}", err=True)
            sys.exit(EXIT_ERROR)
        except sqlite3.Error as exc:
            from .._store import get_store

            click.echo(
                f"valent: error: cannot read the results store {get_store().path}: "
                f"{fmt.one_line(str(exc))}; check VALENT_RESULTS_DIR",
                err=True,
            )
            sys.exit(EXIT_ERROR)

    return wrapper


# ---------------------------------------------------------------------- reading


def _store() -> Any:
    from .._store import get_store

    return get_store()


def _row(store: Any, dispatch_id: str) -> Any:
    """The dispatch's row (a full id or unique prefix), its owner checked for death."""
    from ..api import check_owner

    return check_owner(store, store.dispatch_row(store.resolve(dispatch_id)))


# ---------------------------------------------------------------------- commands


@click.command("list")
@click.option("--status", "status", type=click.Choice(_ALL_STATUSES, case_sensitive=False),
              help="Only dispatches with this status.")
@click.option("--limit", "-n", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many dispatches to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of objects).")
@click.option("--all", "-a", "show_all", is_flag=True,
              help="Also the child dispatches of sublattices, indented under their parent.")
@_errors
def list_cmd(status: str | None, limit: int, as_json: bool, show_all: bool) -> None:
    """Recent dispatches, newest first (FROM: the dispatch a redispatch came from)."""
    from ..api import reap_orphans

    store = _store()
    reap_orphans(store)
    rows = store.list_dispatches(
        status=status.upper() if status else None, limit=limit, children=False
    )
    depth: dict[str, int] = {}
    if show_all:
        rows, depth = _with_children(store, rows)
    if as_json:
        fmt.echo_json([
            {
                "dispatch_id": r["dispatch_id"],
                "lattice_name": r["lattice_name"],
                "status": r["status"],
                "created_at": fmt.ts(r["created_at"]),
                "start_time": fmt.ts(r["start_time"]),
                "end_time": fmt.ts(r["end_time"]),
                "duration": fmt.duration(r),
                "nodes_done": r["done"],
                "node_count": r["node_count"],
                "error": r["error"],
                "redispatch_of": r["redispatch_of"],
                "parent_dispatch_id": r["parent_dispatch_id"],
                "parent_node_id": r["parent_node_id"],
                "root_dispatch_id": r["root_dispatch_id"] or r["dispatch_id"],
            }
            for r in rows
        ])
        return
    if not rows:
        click.echo(f"no dispatches{f' with status {status.upper()}' if status else ''} "
                   f"in {store.path}")
        return
    table = [
        (
            "  " * depth.get(r["dispatch_id"], 0) + r["dispatch_id"][:8],
            "  " * depth.get(r["dispatch_id"], 0) + r["lattice_name"], r["status"],
            fmt.local(r["start_time"] or r["created_at"]), fmt.fmt_secs(fmt.duration(r)),
            f"{r['done']}/{r['node_count']}", (r["redispatch_of"] or "-")[:8],
        )
        for r in rows
    ]
    headers: tuple[str, ...] = ("ID", "LATTICE", "STATUS", "STARTED", "DURATION", "NODES")
    if any(r["redispatch_of"] for r in rows):
        headers += ("FROM",)  # the dispatch a redispatch came from
    else:
        table = [t[:-1] for t in table]
    click.echo(fmt.table(headers, table, 2))


def _with_children(store: Any, rows: list[Any]) -> tuple[list[Any], dict[str, int]]:
    """``rows`` with each one's child dispatches (recursively) after it, and their depth."""
    out: list[Any] = []
    depth: dict[str, int] = {}

    def add(row: Any, level: int) -> None:
        out.append(row)
        depth[row["dispatch_id"]] = level
        for child in store.child_dispatches(row["dispatch_id"]):
            add(child, level + 1)

    for r in rows:
        add(r, 0)
    return out, depth


@click.command("status")
@click.argument("dispatch_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_errors
def status_cmd(dispatch_id: str, as_json: bool) -> None:
    """A short summary of one dispatch (ID or a unique prefix)."""
    store = _store()
    row = _row(store, dispatch_id)
    nodes = store.node_rows(row["dispatch_id"], with_outputs=False)
    if as_json:
        data = fmt.dispatch_json(row, nodes)
        data["nodes"] = [fmt.node_json(n) for n in nodes]
        fmt.echo_json(data)
        return
    done, total, counts = node_counts(nodes)
    spread = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    lines = [
        f"dispatch  {row['dispatch_id']}",
        f"lattice   {row['lattice_name']}",
        f"status    {fmt.styled(row['status'])}",
        f"started   {fmt.local(row['start_time'] or row['created_at'])}"
        f"   duration {fmt.fmt_secs(fmt.duration(row))}",
        f"nodes     {done}/{total} done ({spread})",
        f"owner     pid {row['owner_pid']} on {row['owner_host']}",
    ]
    running = [fmt.label(n) for n in nodes if n["status"] == Status.RUNNING]
    if running:
        more = f" and {len(running) - 8} more" if len(running) > 8 else ""
        lines.append(f"running   {', '.join(running[:8])}{more}")
    if row["error"]:
        lines.append(f"error     {row['error']}")
    if "redispatch_of" in row.keys() and row["redispatch_of"]:
        lines.append(f"from      {row['redispatch_of']} (redispatch)")
    if "parent_dispatch_id" in row.keys() and row["parent_dispatch_id"]:
        lines.append(f"parent    {row['parent_dispatch_id']} node {row['parent_node_id']} "
                     f"(root {row['root_dispatch_id']})")
    click.echo("\n".join(lines))


@click.command("show")
@click.argument("dispatch_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (outputs as repr strings).")
@_errors
def show_cmd(dispatch_id: str, as_json: bool) -> None:
    """The full Result of one dispatch, as print(result) shows it, and a per-node table."""
    from ..result import Result

    store = _store()
    row = _row(store, dispatch_id)
    nodes = store.node_rows(row["dispatch_id"])
    result = Result(row, nodes, str(store.dir))
    if as_json:
        data = fmt.dispatch_json(row, nodes)
        data["result"] = fmt.safe_repr(lambda: result.result)
        data["inputs"] = fmt.safe_repr(lambda: result.inputs)
        data["nodes"] = []
        for n in nodes:
            item = fmt.node_json(n)
            item["output"] = fmt.safe_repr(
                lambda n=n: result.get_node_result(n["node_id"])["output"]
            )
            item["traceback"] = n["traceback"]
            data["nodes"].append(item)
        fmt.echo_json(data)
        return
    click.echo(str(result))
    click.echo("Nodes\n-----")
    click.echo(fmt.node_table(fmt.node_tree(store, row["dispatch_id"], nodes)))


@click.command("cancel")
@click.argument("dispatch_id")
@click.option("--task", "-t", "tasks", type=int, multiple=True, metavar="N",
              help="Cancel only node N and its dependents (repeatable).")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until the owner confirms the tasks stopped, then print the outcomes.")
@click.option("--timeout", type=fmt.Seconds(0), default=60.0, show_default=True,
              help="Seconds to wait for the confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@_errors
def cancel_cmd(
    dispatch_id: str, tasks: tuple[int, ...], wait: bool, timeout: float, as_json: bool
) -> None:
    """Cancel a dispatch (or some of its tasks) from any process, and report what stopped."""
    from .. import api

    store = _store()
    row = _row(store, dispatch_id)
    did = row["dispatch_id"]
    nodes = store.node_rows(did, with_outputs=False)
    bad = [t for t in tasks if not 0 <= t < len(nodes)]
    if bad:
        raise _Fail(
            f"error: dispatch {did[:8]} has no task id(s) {bad}; valid ids are "
            f"0..{len(nodes) - 1} (`valent show {did[:8]}` lists them)"
        )
    t0 = time.monotonic()
    message = api.cancel(did, list(tasks) or None)
    targets = _targets(nodes, tasks)
    if not wait or row["status"] in FINAL_VALUES:
        if as_json:
            fmt.echo_json({"dispatch_id": did, "message": message, "status": row["status"],
                           "error": row["error"]})
        else:
            click.echo(message)
            if row["status"] in FINAL_VALUES and row["error"]:
                click.echo(f"error: {row['error']}")
        return
    if not as_json:
        click.echo(message)
    row, nodes, finished = _wait_stopped(store, did, targets, timeout)
    took = time.monotonic() - t0
    shown = [n for n in nodes if n["node_id"] in targets and n["kind"] != "parameter"]
    outcomes: dict[str, int] = {}
    for n in shown:
        if n["cancel_outcome"]:
            outcomes[n["cancel_outcome"]] = outcomes.get(n["cancel_outcome"], 0) + 1
    if as_json:
        data = fmt.dispatch_json(row, nodes)
        data.update(
            message=message, confirmed=finished, seconds=round(took, 4), outcomes=outcomes,
            nodes=[fmt.node_json(n) for n in shown],
        )
        fmt.echo_json(data)
    else:
        click.echo(fmt.node_table(shown))
        spread = ", ".join(f"{v} {k}" for k, v in sorted(outcomes.items())) or "no outcomes"
        what = f"task(s) {sorted(set(tasks))} and dependents " if tasks else ""
        state = "stopped" if finished else "NOT confirmed stopped"
        click.echo(
            f"dispatch {did[:8]} {fmt.styled(row['status'])}: {what}{state} after {took:.2f}s "
            f"({spread})"
        )
    if not finished:
        raise _Fail(
            f"cancel of {did[:8]} not confirmed within {timeout:g}s; the owner (pid "
            f"{row['owner_pid']}) may be busy; `valent watch {did[:8]}` follows it",
            EXIT_CANCEL_TIMEOUT,
        )


def _targets(nodes: Sequence[Any], tasks: Sequence[int]) -> set[int]:
    """Node ids a cancel of ``tasks`` reaches: them and every dependent (all when empty)."""
    if not tasks:
        return {n["node_id"] for n in nodes}
    children: dict[int, list[int]] = {n["node_id"]: [] for n in nodes}
    for n in nodes:
        for p in json.loads(n["parents"]):
            children[p].append(n["node_id"])
    seen: set[int] = set()
    stack = list(tasks)
    while stack:
        t = stack.pop()
        if t not in seen:
            seen.add(t)
            stack.extend(children[t])
    return seen


def _wait_stopped(
    store: Any, did: str, targets: set[int], timeout: float
) -> tuple[Any, list[Any], bool]:
    """Poll the store until every target node is final (or the dispatch is)."""
    from ..api import check_owner

    deadline = time.monotonic() + timeout
    while True:
        row = check_owner(store, store.dispatch_row(did))
        nodes = store.node_rows(did, with_outputs=False)
        if row["status"] in FINAL_VALUES or all(
            n["status"] in FINAL_VALUES for n in nodes if n["node_id"] in targets
        ):
            return row, nodes, True
        if time.monotonic() >= deadline:
            return row, nodes, False
        time.sleep(0.02)


@click.command("watch")
@click.argument("dispatch_id")
@click.option("--interval", type=fmt.Seconds(0.05, 3600), default=0.25, show_default=True,
              help="Seconds between refreshes.")
@_errors
def watch_cmd(dispatch_id: str, interval: float) -> None:
    """Follow a dispatch live until it ends; Ctrl-C stops watching, not the dispatch.

    On a terminal: a live table and progress bar. Otherwise: one line per node change.
    """
    store = _store()
    row = _row(store, dispatch_id)
    did = row["dispatch_id"]
    try:
        if sys.stdout.isatty():
            row = _watch_live(store, did, interval)
        else:
            row = _watch_lines(store, did, interval)
    except KeyboardInterrupt:
        click.echo(
            f"\nstopped watching; dispatch {did[:8]} goes on "
            f"(`valent cancel {did[:8]}` stops it)",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    click.echo(f"dispatch {did[:8]} ended {fmt.styled(row['status'])} after "
               f"{fmt.fmt_secs(fmt.duration(row))}")
    if row["error"]:
        click.echo(f"error: {row['error']}")


def _snapshot(store: Any, did: str) -> tuple[Any, list[Any]]:
    from ..api import check_owner

    row = check_owner(store, store.dispatch_row(did))
    return row, store.node_rows(did, with_outputs=False)


def _watch_lines(store: Any, did: str, interval: float) -> Any:
    seen: dict[tuple[str, int], str] = {}
    last_status = None
    while True:
        row, nodes = _snapshot(store, did)
        done, total, _ = node_counts(nodes)
        if row["status"] != last_status:
            last_status = row["status"]
            click.echo(f"{_clock()}  dispatch {did[:8]} ({row['lattice_name']}) "
                       f"{fmt.styled(row['status'])}  [{done}/{total}]")
        for n in fmt.node_tree(store, did, nodes):
            key = (n["dispatch_id"], n["node_id"])
            if n["kind"] == "parameter" or seen.get(key) == n["status"]:
                continue
            seen[key] = n["status"]
            extra = f" ({n['cancel_outcome']})" if n["cancel_outcome"] else ""
            note = fmt.node_note(n) if n["status"] in ("FAILED", "CANCELLED") else ""
            click.echo(f"{_clock()}  {fmt.tree_label(n)} {fmt.styled(n['status'])}{extra}"
                       f"{'  ' + note if note else ''}  [{done}/{total}]")
        if row["status"] in FINAL_VALUES:
            return row
        time.sleep(interval)


def _clock() -> str:
    return datetime.now().strftime("%H:%M:%S")


def _watch_live(store: Any, did: str, interval: float) -> Any:
    from rich.console import Console, Group
    from rich.live import Live
    from rich.table import Table

    console = Console()
    bar = make_bar(console)
    task = bar.add_task(did[:8], total=None, elapsed="")

    def render(row: Any, nodes: list[Any]) -> Any:
        update_bar(bar, task, row, nodes)
        table = Table(box=None, pad_edge=False)
        for col in ("ID", "NAME", "STATUS", "EXECUTOR", "CANCEL", "DURATION", "REASON"):
            table.add_column(col, no_wrap=col != "REASON")
        for n in fmt.node_tree(store, did, nodes):
            st = n["status"]
            table.add_row(
                fmt.tree_id(n), fmt.tree_name(n), f"[{fmt.STATUS_COLORS.get(st, 'white')}]{st}",
                n["executor"] or "-", n["cancel_outcome"] or "-",
                fmt.fmt_secs(fmt.node_duration(n)), fmt.node_note(n),
            )
        return Group(table, bar)

    row, nodes = _snapshot(store, did)
    with Live(render(row, nodes), console=console, auto_refresh=False) as live:
        while row["status"] not in FINAL_VALUES:
            time.sleep(interval)
            row, nodes = _snapshot(store, did)
            live.update(render(row, nodes), refresh=True)
    return row


@click.command("logs")
@click.argument("dispatch_id")
@click.argument("node", required=False)
@click.option("--stream", type=click.Choice(["both", "stdout", "stderr"]), default="both",
              show_default=True, help="Which captured stream to print.")
@click.option("--follow", "-f", is_flag=True,
              help="With NODE: print its output as it comes until it ends (stderr to stderr).")
@_errors
def logs_cmd(dispatch_id: str, node: str | None, stream: str, follow: bool) -> None:
    """A task's captured stdout/stderr (NODE: an id, a name, or name(id)); all tasks if omitted.

    Output is stored when a task ends (completed, failed or cancelled). While a Local task
    runs, its output so far is shown (read from the files its worker writes, on the machine
    that dispatched it).
    """
    store = _store()
    row = _row(store, dispatch_id)
    did = row["dispatch_id"]
    nodes = [n for n in store.node_rows(did) if n["kind"] == "electron"]
    if node is not None:
        nodes = [_pick_node(did, nodes, node)]
    streams = ("stdout", "stderr") if stream == "both" else (stream,)
    if follow:
        if node is None:
            raise _Fail("error: --follow needs NODE, the one task to follow")
        try:
            _follow(store, row, nodes[0], streams)
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)
        return
    printed = False
    for n in nodes:
        so_far = ""
        texts = _live_texts(row, n, streams)
        if texts is not None:
            now = store.node_row(did, n["node_id"])
            if now["status"] != n["status"]:  # it ended while we read: the stored output
                n, texts = now, None
            else:
                so_far = " (so far)"
        if texts is None:
            texts = [(s, n[s]) for s in streams if n[s]]
        if not texts and node is None:
            continue
        header = f"== {fmt.label(n)} [{n['status']}]"
        if not texts:
            why = "it printed nothing"
            if n["status"] in ("PENDING", "NEW_OBJECT"):
                why = "it has not started"
            elif n["status"] == "RUNNING" and not so_far:
                why = "it is running; its executor stores its output when it ends"
            elif so_far:
                why = "it is running and printed nothing yet"
            click.echo(f"{header}: no {' or '.join(streams)} ({why})")
            printed = True
            continue
        for s, text in texts:
            click.echo(f"{header} {s}{so_far} ==")
            click.echo(text, nl=not text.endswith("\n"))
            printed = True
    if not printed:
        click.echo(f"no captured {' or '.join(streams)} in dispatch {row['dispatch_id'][:8]}")


def _live_paths(row: Any, n: Any) -> dict[str, str] | None:
    """``{stream: file}`` holding a running task's output so far, if readable from here."""
    import socket

    if n["status"] != "RUNNING" or "live_output" not in n.keys() or not n["live_output"]:
        return None  # (a store on read-only media, made by an older valent, lacks the column)
    if row["owner_host"] and row["owner_host"] != socket.gethostname():
        return None
    try:
        paths = json.loads(n["live_output"])
    except ValueError:
        return None
    return {s: p for s, p in zip(("stdout", "stderr"), paths, strict=False) if p}


def _follow(store: Any, row: Any, n: Any, streams: Sequence[str], every: float = 0.2) -> None:
    """Print a task's output as its files grow, then the rest from the store once it ends."""
    import codecs

    did, nid = row["dispatch_id"], n["node_id"]
    decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in streams}
    offsets = dict.fromkeys(streams, 0)
    shown = dict.fromkeys(streams, 0)  # characters printed from the live files
    live = dict.fromkeys(streams, True)  # False once a file was reused by another task
    checked = 0.0
    while True:
        if time.monotonic() - checked > 1.0:  # notices a dead owner (marks it FAILED)
            row, checked = _row(store, did), time.monotonic()
        n = store.node_row(did, nid)
        if n["status"] in FINAL_VALUES:
            break
        paths = _live_paths(row, n) or {}
        for s in streams:
            if s not in paths or not live[s]:
                continue
            try:
                with open(paths[s], "rb") as f:
                    if os.fstat(f.fileno()).st_size < offsets[s]:
                        live[s] = False  # truncated: its worker moved on to another task
                        continue
                    f.seek(offsets[s])
                    data = f.read(1 << 20)
            except OSError:
                continue
            offsets[s] += len(data)
            text = decoders[s].decode(data)
            if text:
                shown[s] += len(text)
                click.echo(text, nl=False, err=s == "stderr")
        time.sleep(every)
    for s in streams:
        stored = n[s] or ""
        if stored.startswith("[... "):  # longer than what the store keeps: it has the tail
            if shown[s]:
                click.echo(f"\n[... the rest: `valent logs {did[:8]} {nid}` ...]", err=True)
            else:
                click.echo(stored, nl=not stored.endswith("\n"), err=s == "stderr")
        elif len(stored) > shown[s]:
            rest = stored[shown[s]:]
            click.echo(rest, nl=not rest.endswith("\n"), err=s == "stderr")
    click.echo(f"== {fmt.label(n)} ended {n['status']}", err=True)


def _live_texts(row: Any, n: Any, streams: Sequence[str]) -> list[tuple[str, str]] | None:
    """A running task's output so far, from the files its executor named; None when there
    are none (not running, an executor that stores output only at the end, another host)."""
    from .._pool.pool import tail

    paths = _live_paths(row, n)
    if paths is None:
        return None
    return [(s, text) for s in streams if paths.get(s) and (text := tail(paths[s]))]


def _pick_node(did: str, nodes: Sequence[Any], spec: str) -> Any:
    if spec.isdigit():
        hits = [n for n in nodes if n["node_id"] == int(spec)]
    else:
        hits = [n for n in nodes if fmt.label(n) == spec] or [n for n in nodes if n["name"] == spec]
    if len(hits) == 1:
        return hits[0]
    names = ", ".join(fmt.label(n) for n in (hits or nodes)[:10])
    what = f"{spec!r} is ambiguous" if hits else f"no task {spec!r}"
    raise _Fail(f"error: dispatch {did[:8]}: {what}; its tasks: {names}")


@click.command("redispatch")
@click.argument("dispatch_id")
@click.option("--reuse", is_flag=True,
              help="Reuse the outputs of nodes that completed with the same function and "
                   "inputs (resume a cancelled, failed or orphaned dispatch).")
@click.option("--replace", "replacements", multiple=True, metavar="NAME=MODULE:FUNCTION",
              help="Run MODULE:FUNCTION (an electron, lattice or function) in place of the "
                   "electrons called NAME (repeatable).")
@_errors
def redispatch_cmd(dispatch_id: str, reuse: bool, replacements: tuple[str, ...]) -> None:
    """Run a dispatch's workflow again with its inputs; print the new id, then its end.

    This process owns the new dispatch: it runs it to the end (Ctrl-C cancels it). Exit 0
    when it COMPLETED, 1 otherwise.
    """
    from .._redispatch import redispatch

    replace = {name: obj for name, obj in (_load_replacement(r) for r in replacements)}
    store = _store()
    did = _row(store, dispatch_id)["dispatch_id"]
    new_id = redispatch(did, replace_electrons=replace, reuse_previous_results=reuse)()
    click.echo(new_id)
    sys.stdout.flush()
    from .. import api

    result = api.get_result(new_id, wait=True)
    reused = sum(
        1 for n in store.node_rows(new_id, with_outputs=False)
        if (n["reason"] or "").startswith("reused from")
    )
    click.echo(f"dispatch {new_id[:8]} (from {did[:8]}) ended {fmt.styled(result.status)} "
               f"after {fmt.fmt_secs(fmt.duration(store.dispatch_row(new_id)))}; "
               f"{reused} node(s) reused")
    if result.status != Status.COMPLETED:
        if result.error:
            click.echo(f"error: {result.error}")
        sys.exit(EXIT_ERROR)


def _load_replacement(spec: str) -> tuple[str, Any]:
    """``NAME=MODULE:FUNCTION`` -> (NAME, the object), importing MODULE (the current folder
    is searched too)."""
    import importlib

    name, eq, target = spec.partition("=")
    module, colon, attr = target.partition(":")
    if not (eq and colon and name and module and attr):
        raise _Fail(f"error: --replace {spec!r}: give NAME=MODULE:FUNCTION, like "
                    "--replace task_2=mymodule:task_2_fixed")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise _Fail(f"error: --replace {spec!r}: cannot load {target}: {exc}") from exc
    return name, obj


@click.group("triggers", invoke_without_command=True)
@click.option("--all", "-a", "show_all", is_flag=True, help="Also the stopped ones.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@_errors
def triggers_cmd(ctx: click.Context, show_all: bool, as_json: bool) -> None:
    """The triggers of any process (`valent triggers stop` stops them)."""
    if ctx.invoked_subcommand is not None:
        return
    rows = _store().list_triggers(everything=show_all)
    data = [_trigger_json(r) for r in rows]
    if as_json:
        fmt.echo_json(data)
        return
    if not data:
        click.echo("no triggers" + ("" if show_all else " running (--all shows stopped ones)"))
        return
    table = [
        (t["id"], t["dispatch_id"][:8], t["kind"], fmt.one_line(json.dumps(t["settings"]))[:50],
         t["state"], t["fired"], (t["last_dispatch_id"] or "-")[:8], t["owner"]["pid"])
        for t in data
    ]
    click.echo(fmt.table(
        ("ID", "DISPATCH", "KIND", "WATCHES", "STATE", "FIRED", "LAST", "OWNER"), table
    ))


def _trigger_state(r: Any) -> str:
    from ..api import _owner_dead

    if r["stopped_at"] is not None:
        return f"stopped: {r['stop_reason']}"
    owner = {"owner_host": r["owner_host"], "owner_pid": r["owner_pid"],
             "owner_started": r["owner_started"], "dispatch_id": r["dispatch_id"],
             "status": "RUNNING"}
    if _owner_dead(owner):
        return "gone: its process exited"
    return "stopping" if r["stop_requested_at"] is not None else "running"


def _trigger_json(r: Any) -> dict[str, Any]:
    return {
        "id": r["id"], "dispatch_id": r["dispatch_id"], "kind": r["kind"],
        "settings": json.loads(r["settings"] or "{}"), "state": _trigger_state(r),
        "fired": r["fired"], "last_dispatch_id": r["last_dispatch_id"],
        "started_at": fmt.ts(r["started_at"]), "stopped_at": fmt.ts(r["stopped_at"]),
        "owner": {"pid": r["owner_pid"], "host": r["owner_host"]},
    }


@triggers_cmd.command("stop")
@click.argument("trigger_ids", type=int, nargs=-1)
@click.option("--dispatch", "-d", "dispatch_ids", multiple=True, metavar="ID",
              help="Stop every trigger of this dispatch (repeatable).")
@click.option("--timeout", type=fmt.Seconds(0), default=10.0, show_default=True,
              help="Seconds to wait for their owners to confirm.")
@_errors
def triggers_stop_cmd(
    trigger_ids: tuple[int, ...], dispatch_ids: tuple[str, ...], timeout: float
) -> None:
    """Stop triggers (by id, or all of a dispatch), whichever process runs them."""
    if not trigger_ids and not dispatch_ids:
        raise _Fail("error: give trigger ids, or --dispatch ID (`valent triggers` lists them)")
    store = _store()
    dids = [store.resolve(d) for d in dispatch_ids]
    asked = store.request_trigger_stop(trigger_ids=trigger_ids, dispatch_ids=dids)
    if not asked:
        raise _Fail("error: no running trigger matches (`valent triggers --all` lists them)")
    gone = [r["id"] for r in asked if _trigger_state(r).startswith("gone")]
    store.trigger_stopped(gone, "its process had exited")
    ids = {r["id"] for r in asked}
    deadline = time.monotonic() + timeout
    while True:
        left = [r for r in store.list_triggers() if r["id"] in ids]
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    for r in asked:
        state = "NOT confirmed stopped" if any(x["id"] == r["id"] for x in left) else "stopped"
        click.echo(f"trigger {r['id']} ({r['kind']} of {r['dispatch_id'][:8]}): {state}")
    if left:
        raise _Fail(f"{len(left)} trigger(s) not confirmed stopped within {timeout:g}s",
                    EXIT_CANCEL_TIMEOUT)


def register(cli: click.Group) -> None:
    """Add this module's commands to the `valent` group."""
    for cmd in (list_cmd, status_cmd, show_cmd, cancel_cmd, watch_cmd, logs_cmd, redispatch_cmd,
                triggers_cmd):
        cli.add_command(cmd)
