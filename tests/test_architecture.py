"""The layering the architecture promises, checked on the source with ``ast``.

- The core (``valent``) never imports a plugin package (``valent_local``, ``valent_dask``,
  ``valent_ssh``, or any other executor package).
- A plugin imports nothing of the core but ``valent`` itself and ``valent.plugin`` (the
  declared plugin-author API; ``valent.testing`` too, in its tests), and never another plugin.
- ``valent.plugin`` exports every name it declares, and the documentation's snippets that
  import from valent use only public modules.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core" / "valent"
PLUGINS = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").exists())
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*/src/valent_*"))
PLUGIN_NAMES = {p.name for p in PLUGINS} | {e.name for e in EXAMPLES}
PUBLIC = {"valent", "valent.plugin"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path`` (relative ones resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.append((node.lineno, node.module or ""))
                if node.module == "valent":  # from valent import x: x may be a module
                    out += [(node.lineno, f"valent.{a.name}") for a in node.names
                            if (CORE / a.name).exists() or (CORE / f"{a.name}.py").exists()]
            else:
                out.append((node.lineno, "." * node.level + (node.module or "")))
    return out


def test_the_core_never_imports_a_plugin():
    bad = []
    for path in CORE.rglob("*.py"):
        for line, mod in _imports(path):
            if mod.split(".")[0] in PLUGIN_NAMES:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "the core must not depend on a plugin:\n" + "\n".join(bad)


def test_plugins_import_only_the_declared_api_and_never_each_other():
    bad = []
    for folder in [*PLUGINS, *EXAMPLES]:
        for path in folder.rglob("*.py"):
            for line, mod in _imports(path):
                top = mod.split(".")[0]
                where = f"{path.relative_to(ROOT)}:{line} imports {mod}"
                if top == "valent" and mod not in PUBLIC:
                    bad.append(where + " (import it from valent.plugin)")
                elif top in PLUGIN_NAMES and top != folder.name:
                    bad.append(where + " (another plugin)")
    assert not bad, "\n".join(bad)


def test_the_plugin_api_exports_what_it_declares():
    import valent.plugin as api

    missing = [name for name in api.__all__ if not hasattr(api, name)]
    assert not missing
    for name in ("Executor", "Capabilities", "Wake", "Task", "Upstream", "hookimpl",
                 "ProcessPool", "CancelOutcome", "Running", "Cancelled", "set_process_token"):
        assert name in api.__all__, name


def test_docs_import_only_public_modules():
    public = {"valent", "valent.plugin", "valent.testing", "valent.executor", "valent.executors",
              "valent.timing", "valent.fs", "valent.triggers", "valent.executor.base"}
    bad = []
    for doc in [*(ROOT / "docs").glob("*.md"), ROOT / "README.md"]:
        text = doc.read_text()
        for m in re.finditer(r"^\s*(?:from|import) (valent(?:\.\w+)*)(?!\w)", text, re.M):
            if m.group(1) not in public:
                bad.append(f"{doc.name}: {m.group(0).strip()}")
    assert not bad, "docs import internals:\n" + "\n".join(bad)


def test_internal_packages_are_private():
    """Every subpackage or module under valent/ that is not part of a public surface starts
    with an underscore, except the ones listed here as public on purpose."""
    public_modules = {
        "__init__", "api", "plugin", "executor", "executors", "testing", "errors", "status",
        "task", "graph", "result", "config", "cli", "ui", "timing", "cancel_token", "deps",
        "lepton", "lifecycle", "checks", "pickling", "fs", "triggers", "redispatch",
    }
    names = {p.stem for p in CORE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    unexpected = sorted(n for n in names if not n.startswith("_") and n not in public_modules)
    assert not unexpected, f"make these private (_name) or declare them public: {unexpected}"
