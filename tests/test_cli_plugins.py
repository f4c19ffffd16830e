"""``valent plugins``: installed executors, their origin, capabilities, settings, problems."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import valent
from click.testing import CliRunner
from valent.cli import cli


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """A folder on sys.path where tests drop throw-away plugin distributions."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    added: list[str] = []
    yield site, added
    for m in added:
        sys.modules.pop(m, None)


def _dist(fake_site, dist: str, ep: str, module: str, source: str) -> None:
    site, added = fake_site
    info = site / f"{dist.replace('-', '_')}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[valent]\n{ep} = {module}\n")
    (site / f"{module}.py").write_text(source)
    added.append(module)


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["plugins", *args], terminal_width=200)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


def test_table_lists_builtin_executors_with_capabilities_and_settings():
    code, out = run()
    assert code == 0
    for name in ("local", "dask"):
        assert name in out
    assert f"valent {valent.__version__}" in out
    assert "LocalExecutor" in out
    assert "cancel" in out and "pending" in out and "kill" in out and "grace" in out
    assert "workers=None" in out and "capture_output=True" in out
    assert "[executors.NAME]" in out
    assert "problem" not in out


def test_json_has_distribution_capabilities_and_settings():
    code, out = run("--json")
    assert code == 0
    data = json.loads(out)
    local = next(e for e in data["executors"] if e["name"] == "local")
    assert local["distribution"] == "valent" and local["version"] == valent.__version__
    assert local["class"] == "valent_local.executor.LocalExecutor"
    assert (local["cancel_pending"], local["stop_running"], local["kill_tree"]) == (
        True, True, True)
    assert {s["name"]: s["default"] for s in local["settings"]}["grace"] == 1.0
    assert data["problems"] == []


def test_config_values_are_shown_next_to_defaults(tmp_path, monkeypatch):
    cfg = tmp_path / "valent.toml"
    cfg.write_text("[executors.local]\nworkers = 3\n")
    monkeypatch.setenv("VALENT_CONFIG", str(cfg))
    code, out = run()
    assert code == 0 and "workers=None → 3 (config)" in out and str(cfg) in out
    local = next(e for e in json.loads(run("--json")[1])["executors"] if e["name"] == "local")
    assert {s["name"]: s.get("configured") for s in local["settings"]}["workers"] == 3


def test_bad_config_is_a_problem_not_a_crash(tmp_path, monkeypatch):
    cfg = tmp_path / "valent.toml"
    cfg.write_text("[executors.local\n")
    monkeypatch.setenv("VALENT_CONFIG", str(cfg))
    code, out = run()
    assert code == 0 and "local" in out and "not valid TOML" in out


def test_broken_plugin_is_listed_as_a_problem_and_the_rest_still_show(fake_site):
    _dist(fake_site, "valent-broken", "broken", "vt_cli_broken", "import vt_missing_dep\n")
    code, out = run()
    assert code == 0
    assert "1 problem(s)" in out
    assert "entry point 'broken' = 'vt_cli_broken' of distribution valent-broken 0.3" in out
    assert "vt_missing_dep" in out
    assert "local" in out and "LocalExecutor" in out


def test_observer_plugins_and_disabled_plugins_are_shown(fake_site, monkeypatch):
    _dist(fake_site, "valent-watcher", "watcher", "vt_cli_watcher", (
        "import valent\n\n"
        "@valent.hookimpl\n"
        "def valent_dispatch_finished(dispatch_id, status):\n"
        "    pass\n"
    ))
    monkeypatch.setenv("VALENT_DISABLE_PLUGINS", "dask")
    code, out = run()
    assert "observer plugin watcher: valent_dispatch_finished" in out
    assert "disabled dask" in out and "VALENT_DISABLE_PLUGINS" in out
    assert "DaskExecutor" not in out


def test_console_script_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "valent.cli", "plugins", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "local" in {e["name"] for e in json.loads(out.stdout)["executors"]}


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ("[executors.local]\ngrce = 2\n", ["unknown key 'grce'", "did you mean 'grace'"]),
        ("[executors.local]\ngrace = nan\n", ["grace = nan", "not a finite number"]),
        ("[executors.local]\nmax_workers = 0\n", ["max_workers = 0", "whole number >= 1"]),
        ("[executors.lcoal]\nworkers = 2\n", ["[executors.lcoal]", "did you mean 'local'"]),
    ],
    ids=["misspelled-key", "nan", "zero-workers", "misspelled-executor"],
)
def test_plugins_shows_the_config_problems_dispatch_refuses(tmp_path, monkeypatch, table, words):
    """`valent plugins` once listed a misspelled key as if all were well, while dispatch
    refused it: both now run the same check."""
    cfg = tmp_path / "valent.toml"
    cfg.write_text(table)
    monkeypatch.setenv("VALENT_CONFIG", str(cfg))
    data = json.loads(run("--json")[1])
    problems = "\n".join(data["problems"])
    assert str(cfg) in problems
    for w in words:
        assert w in problems
    code, out = run()
    assert code == 0 and "1 problem(s)" in out
