"""Plugin discovery: broken, clashing and disabled plugins are left out, clearly, and the rest work.

Each test builds throw-away distributions (a ``*.dist-info`` with ``entry_points.txt`` plus a
module) in a temporary folder put on ``sys.path``, exactly what ``pip install`` leaves behind.
"""

from __future__ import annotations

import sys
import textwrap
import warnings

import pytest
import valent as ct
from valent._plugins import manager as plugins_module
from valent._plugins.manager import PluginWarning, build_plugins, get_plugins
from valent_local import LocalExecutor

GOOD_EXECUTOR = """
import valent
from valent_local import LocalExecutor

class {cls}(LocalExecutor):
    name = "{name}"

@valent.hookimpl
def valent_executors():
    return [{cls}]
"""


@pytest.fixture
def make_dist(tmp_path, monkeypatch):
    """``make_dist(dist, {entry_point: module}, {module: source})`` installs a fake package."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules: list[str] = []

    def make(dist: str, entry_points: dict[str, str], sources: dict[str, str],
             version: str = "1.0") -> None:
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
        )
        lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[valent]\n{lines}")
        for module, source in sources.items():
            (site / f"{module}.py").write_text(textwrap.dedent(source))
            modules.append(module)

    yield make
    for module in modules:
        sys.modules.pop(module, None)


def _problem(plugins, needle: str) -> str:
    found = [p for p in plugins.problems if needle in p]
    assert len(found) == 1, f"expected one problem about {needle!r}: {plugins.problems}"
    return found[0]


def test_builtins_load_with_their_distribution():
    plugins = build_plugins()
    assert plugins.problems == []
    info = plugins.executors["local"]
    assert info.cls is LocalExecutor
    assert (info.plugin, info.distribution, info.version) == ("local", "valent", ct.__version__)


def test_good_third_party_plugin_is_found(make_dist):
    make_dist("valent-goodone", {"goodone": "vt_goodone"},
              {"vt_goodone": GOOD_EXECUTOR.format(cls="GoodExecutor", name="goodone")})
    plugins = build_plugins()
    assert plugins.problems == []
    info = plugins.executors["goodone"]
    assert (info.plugin, info.distribution, info.version) == ("goodone", "valent-goodone", "1.0")


def test_plugin_that_fails_to_import(make_dist):
    make_dist("valent-slurm", {"slurm": "vt_slurm"},
              {"vt_slurm": "import vt_no_such_dependency\n"}, version="2.3")
    plugins = build_plugins()
    problem = _problem(plugins, "vt_slurm")
    assert "entry point 'slurm' = 'vt_slurm'" in problem
    assert "distribution valent-slurm 2.3" in problem
    assert "failed to import" in problem and "vt_no_such_dependency" in problem
    assert {"local", "dask"} <= set(plugins.executors)  # the others keep working
    with pytest.raises(ct.PluginError, match="'slurm' is not available.*failed to import"):
        plugins.executor_class("slurm")


def test_duplicate_executor_name_keeps_the_first(make_dist):
    make_dist("valent-impostor", {"impostor": "vt_impostor"},
              {"vt_impostor": GOOD_EXECUTOR.format(cls="Impostor", name="local")})
    plugins = build_plugins()
    problem = _problem(plugins, "impostor")
    assert "distribution valent-impostor 1.0" in problem
    assert "executor name 'local' is already provided by plugin 'local' of distribution valent"\
        in problem
    assert plugins.executors["local"].cls is LocalExecutor
    assert not plugins.pm.has_plugin("impostor")


def test_duplicate_entry_point_name_in_two_distributions(make_dist):
    make_dist("valent-aaa", {"twin": "vt_twin_a"},
              {"vt_twin_a": GOOD_EXECUTOR.format(cls="A", name="twin_a")})
    make_dist("valent-bbb", {"twin": "vt_twin_b"},
              {"vt_twin_b": GOOD_EXECUTOR.format(cls="B", name="twin_b")})
    plugins = build_plugins()
    problem = _problem(plugins, "vt_twin_b")
    assert "distribution valent-bbb" in problem and "already taken" in problem
    assert "valent-aaa" in problem
    assert "twin_a" in plugins.executors and "twin_b" not in plugins.executors


def test_hook_with_wrong_signature_leaves_the_whole_plugin_out(make_dist):
    source = GOOD_EXECUTOR.format(cls="Sloppy", name="sloppy") + textwrap.dedent("""
        @valent.hookimpl(wrapper=True)
        def valent_poll(executor, handle):
            return (yield)

        @valent.hookimpl
        def valent_run(executor, task, wake, priority):
            return None
    """)
    make_dist("valent-sloppy", {"sloppy": "vt_sloppy"}, {"vt_sloppy": source})
    plugins = build_plugins()
    problem = _problem(plugins, "sloppy")
    assert "entry point 'sloppy' = 'vt_sloppy' of distribution valent-sloppy 1.0" in problem
    assert "valent_run" in problem and "priority" in problem
    # pluggy registers hooks one by one: none of the broken plugin's may stay active.
    assert not plugins.pm.has_plugin("sloppy")
    assert all(i.plugin_name != "sloppy" for i in plugins.pm.hook.valent_poll.get_hookimpls())
    with pytest.raises(ct.PluginError, match="'sloppy' is not available.*priority"):
        plugins.executor_class("sloppy")


def test_misspelled_hook_name_is_reported(make_dist):
    make_dist("valent-typo", {"typo": "vt_typo"}, {"vt_typo": """
        import valent
        from valent_local import LocalExecutor

        class Typo(LocalExecutor):
            name = "typo"

        @valent.hookimpl
        def valent_executor():
            return [Typo]
    """})
    plugins = build_plugins()
    problem = _problem(plugins, "typo")
    assert "'valent_executor', which is not a valent hook" in problem
    assert "did you mean 'valent_executors'" in problem


def test_incomplete_executor_class(make_dist):
    make_dist("valent-half", {"half": "vt_half"}, {"vt_half": """
        import valent

        class Half(valent.Executor):
            name = "half"
            capabilities = valent.Capabilities(True, False, False)

            def run(self, task, wake):
                return None

        @valent.hookimpl
        def valent_executors():
            return [Half]
    """})
    plugins = build_plugins()
    assert "Half does not implement cancel, poll" in _problem(plugins, "half")


def test_executors_hook_that_raises(make_dist):
    make_dist("valent-raiser", {"raiser": "vt_raiser"}, {"vt_raiser": """
        import valent

        @valent.hookimpl
        def valent_executors():
            raise RuntimeError("no licence server")
    """})
    assert "no licence server" in _problem(build_plugins(), "raiser")


def test_entry_point_naming_a_module_without_hooks(make_dist):
    make_dist("valent-empty", {"empty": "vt_empty"}, {"vt_empty": "X = 1\n"})
    assert "has no @valent.hookimpl functions" in _problem(build_plugins(), "vt_empty")


def test_disable_plugins_env(make_dist, monkeypatch):
    make_dist("valent-goodone", {"goodone": "vt_goodone2"},
              {"vt_goodone2": GOOD_EXECUTOR.format(cls="GoodExecutor", name="goodone")})
    monkeypatch.setenv("VALENT_DISABLE_PLUGINS", "goodone, dask")
    plugins = build_plugins()
    assert "goodone" not in plugins.executors and "dask" not in plugins.executors
    assert "local" in plugins.executors
    assert "vt_goodone2" not in sys.modules  # a disabled plugin is not even imported
    assert plugins.problems == []
    with pytest.raises(ct.PluginError, match="'dask' is not available.*VALENT_DISABLE_PLUGINS"):
        plugins.executor_class("dask")


def test_user_sees_a_warning_on_first_use_and_a_clear_error_on_the_broken_name(
    make_dist, monkeypatch
):
    make_dist("valent-slurm", {"slurm": "vt_slurm2"}, {"vt_slurm2": "raise ImportError('x')\n"})
    # A fresh process's plugins; the process's own (which its dispatcher uses) come back after.
    monkeypatch.setattr(plugins_module, "_plugins", None)
    with pytest.warns(PluginWarning, match="valent-slurm.*`valent plugins`"):
        get_plugins()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_plugins()  # only once per process
    with pytest.raises(ct.PluginError, match="distribution valent-slurm 1.0: failed to import"):
        ct.electron(executor="slurm")(lambda: None)
    ct.electron(executor="local")(lambda: None)  # the rest still work
    with pytest.raises(ct.UnknownExecutorError) as info:
        ct.electron(executor="slrum")(lambda: None)
    assert "1 valent plugin(s) failed to load" in "".join(info.value.__notes__)
