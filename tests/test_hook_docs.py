"""Every hookspec is documented where it is declared and in docs/hooks.md, whose examples run.

Fails when a hook in core/valent/_plugins/hookspecs.py lacks a docstring with a summary, a
``:param:`` for each argument and a ``:return:``; when docs/hooks.md lacks its section (signature,
summary, every argument, an example) or documents a hook that does not exist; or when an
example does not register and run.
"""

from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import pluggy
import pytest
import valent
from valent._plugins import hookspecs
from valent._plugins.contract import check_executor_class
from valent._plugins.manager import _Defaults

DOCS = Path(__file__).resolve().parents[1] / "docs" / "hooks.md"
MARK = f"{hookspecs.PROJECT}_spec"


def _specs() -> dict[str, types.FunctionType]:
    return {
        name: fn for name, fn in vars(hookspecs).items()
        if inspect.isfunction(fn) and hasattr(fn, MARK)
    }


SPECS = _specs()


def _sections() -> dict[str, str]:
    text = DOCS.read_text()
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    out = {}
    for part in parts:
        title, _, body = part.partition("\n")
        m = re.fullmatch(r"`(\w+)`", title.strip())
        if m:
            out[m.group(1)] = body
    return out


SECTIONS = _sections()


def test_there_are_hooks():
    assert {"valent_executors", "valent_run", "valent_poll", "valent_cancel"} <= set(SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hookspec_docstring_has_summary_params_and_return(name):
    fn = SPECS[name]
    doc = inspect.getdoc(fn)
    assert doc, f"hookspec {name} has no docstring"
    summary = doc.splitlines()[0]
    assert summary.endswith(".") and len(summary) > 10, f"{name}: give a one-line summary"
    params = list(inspect.signature(fn).parameters)
    documented = re.findall(r":param (\w+):", doc)
    assert documented == params, (
        f"{name}: the docstring documents {documented}, the hook takes {params}"
    )
    ret = inspect.signature(fn).return_annotation
    if ret not in ("None", None):
        assert ":return:" in doc, f"{name}: say what it returns (:return:)"
    if getattr(fn, MARK).get("firstresult"):
        assert "Stops at first non-None result" in doc, f"{name}: say it is firstresult"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hook_has_a_section_in_docs(name):
    assert name in SECTIONS, f"docs/hooks.md has no section '## `{name}`'"
    body = SECTIONS[name]
    fn = SPECS[name]
    params = list(inspect.signature(fn).parameters)
    sig = re.search(rf"^{name}\((.*)\)", body, flags=re.M)
    assert sig, f"docs/hooks.md, {name}: show the signature as '{name}(...)'"
    shown = [a.split(":")[0].strip() for a in sig.group(1).split(",") if a.strip()]
    assert shown == params, f"docs/hooks.md, {name}: signature shows {shown}, hook has {params}"
    summary = inspect.getdoc(fn).splitlines()[0].replace("``", "`")  # reST -> Markdown
    assert summary in body, f"docs/hooks.md, {name}: repeat the docstring's summary {summary!r}"
    for p in params:
        assert f"**`{p}`**" in body, f"docs/hooks.md, {name}: describe the argument {p!r}"
    assert "**Returns:**" in body, f"docs/hooks.md, {name}: describe what it returns"
    assert _example(name), f"docs/hooks.md, {name}: add a ```python example"


def test_docs_document_no_hook_that_does_not_exist():
    stale = [n for n in SECTIONS if n.startswith("valent_") and n not in SPECS]
    assert not stale, f"docs/hooks.md documents hooks that do not exist: {stale}"


def _example(name: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", SECTIONS.get(name, ""), flags=re.S)
    return blocks[-1] if blocks else ""


class _Instant(valent.Executor):
    """Finishes every task at once; enough to drive the hooks."""

    name = "instant"
    capabilities = valent.Capabilities(False, False, False)

    def run(self, task, wake):
        wake()
        return valent.Completed(value=task.run())

    def poll(self, handle):
        return handle

    def cancel(self, handle):
        return valent.CancelOutcome.TOO_LATE


@pytest.mark.parametrize("name", sorted(SPECS))
def test_example_registers_and_runs(name, capsys):
    module = types.ModuleType(f"hooks_md_{name}")
    exec(compile(_example(name), f"docs/hooks.md ({name})", "exec"), module.__dict__)
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(_Defaults(), "defaults")
    pm.register(module, "example")  # validates every hookimpl against its spec
    assert name in {c.name for c in pm.get_hookcallers(module)}, f"example lacks {name}"
    ex = _Instant()
    task = valent.Task("d" * 8, 0, "task_1", lambda: 42)
    hook = getattr(pm.hook, name)
    args = {
        "valent_executors": {},
        "valent_run": {"executor": ex, "task": task, "wake": lambda: None},
        "valent_poll": {"executor": ex, "handle": valent.Failed("boom")},
        "valent_cancel": {"executor": ex, "handle": valent.Completed(value=1)},
        "valent_cancel_many": {"executor": ex, "handles": [valent.Completed(value=1)] * 2},
        "valent_node_status": {"dispatch_id": "d" * 8, "node_id": 0, "name": "task_1",
                               "status": valent.Status.COMPLETED},
        "valent_dispatch_finished": {"dispatch_id": "d" * 8, "status": valent.Status.COMPLETED},
    }[name]
    result = hook(**args)
    if name == "valent_executors":
        classes = [c for got in result for c in got]
        assert classes
        for cls in classes:
            check_executor_class(cls, "docs/hooks.md example")
    elif name == "valent_run":
        assert result == valent.Completed(value=42)
    elif name == "valent_poll":
        assert result == valent.Failed("boom") and "a task failed" in capsys.readouterr().out
    elif name == "valent_cancel":
        assert result == valent.CancelOutcome.TOO_LATE
        assert "too_late" in capsys.readouterr().out
    elif name == "valent_cancel_many":
        assert result == [valent.CancelOutcome.TOO_LATE] * 2
        assert "2 cancels in one batch" in capsys.readouterr().out
    else:
        assert result == [] and "d" * 8 in capsys.readouterr().out
