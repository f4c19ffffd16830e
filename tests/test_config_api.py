"""``ct.get_config`` / ``ct.set_config`` / ``ct.reload_config`` over the TOML file valent reads.

What a Covalent user calls (Covalent's config how-to): the whole config as a dict, one dotted
key, a list of keys; setting one key, or several with a dict; reloading after editing the file.
Covalent's server keys have no meaning here: reading gives None, setting changes nothing, both
with a warning that says why. Every change is checked like the file is, and written atomically.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import tomllib
import warnings

import pytest
import valent as ct
from valent.config import CovalentSettingWarning


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    """VALENT_CONFIG pointing at a file in tmp_path (not created yet)."""
    path = tmp_path / "conf" / "valent.toml"
    monkeypatch.setenv("VALENT_CONFIG", str(path))
    return path


def _read(path):
    return tomllib.loads(path.read_text())


def test_the_api_is_exported():
    for name in ("get_config", "set_config", "reload_config"):
        assert name in ct.__all__ and callable(getattr(ct, name))


def test_get_config_whole_dict_and_dotted_keys(cfg, results_dir):
    cfg.parent.mkdir()
    cfg.write_text("[executors.local]\ngrace = 2.5\n")
    whole = ct.get_config()
    assert isinstance(whole, dict)
    assert whole["results_dir"] == str(results_dir)
    assert whole["default_executor"] == "local"
    assert whole["executors"]["local"]["grace"] == 2.5  # from the file
    assert whole["executors"]["local"]["capture_output"] is True  # the default
    assert "hostname" not in whole["executors"]["ssh"]  # required: no value until set
    assert ct.get_config("executors.local.grace") == 2.5
    assert ct.get_config("executors.dask.n_workers") == 2
    assert ct.get_config(["executors.local.grace", "default_executor"]) == {
        "executors.local.grace": 2.5, "default_executor": "local",
    }
    whole["executors"]["local"]["grace"] = 99  # a copy: changing it changes nothing
    assert ct.get_config("executors.local.grace") == 2.5


def test_an_unknown_key_is_a_config_error_with_a_suggestion(cfg):
    cfg.parent.mkdir()
    cfg.write_text("")
    with pytest.raises(ct.ConfigError, match=r"no config key 'executors.local.grce'.*'grace'"):
        ct.get_config("executors.local.grce")
    with pytest.raises(ct.ConfigError, match="did you mean 'default_executor'"):
        ct.get_config("default_executer")


def test_covalent_server_keys_answer_none_with_a_reason(cfg):
    for key in ("dispatcher.address", "dispatcher.port", "sdk.log_level", "user_interface.port"):
        with pytest.warns(CovalentSettingWarning, match="no server"):
            assert ct.get_config(key) is None
    with pytest.warns(CovalentSettingWarning):
        both = ct.get_config(["dispatcher.address", "dispatcher.port"])
    assert both == {"dispatcher.address": None, "dispatcher.port": None}
    # the one Covalent dispatcher key with a meaning here is the results directory
    cfg.parent.mkdir()
    cfg.write_text("")
    assert ct.get_config("dispatcher.results_dir") == ct.get_config("results_dir")


def test_set_config_writes_the_file_valent_reads(cfg):
    assert not cfg.exists()
    ct.set_config("executors.local.grace", 2.0)
    assert _read(cfg) == {"executors": {"local": {"grace": 2.0}}}
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600  # it may hold hosts and key paths
    ct.set_config({"executors.local.workers": 2, "default_executor": "local"})
    ct.set_config({"executors": {"dask": {"n_workers": 3}}})  # nested works too
    assert _read(cfg) == {
        "default_executor": "local",
        "executors": {"local": {"grace": 2.0, "workers": 2}, "dask": {"n_workers": 3}},
    }
    assert ct.get_config("executors.local.workers") == 2
    ct.set_config("executors.local.grace", None)  # None removes the key: back to the default
    assert "grace" not in _read(cfg)["executors"]["local"]
    assert ct.get_config("executors.local.grace") == 1.0


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("executors.local.grace", float("nan"), ["grace = nan", "not a finite number"]),
        ("executors.local.max_workers", 0, ["max_workers = 0", "whole number >= 1"]),
        ("executors.local.grace", True, ["grace = True", "wrong type"]),
        ("executors.local.grce", 1.0, ["unknown key 'grce'", "did you mean 'grace'"]),
        ("executors.lcoal.grace", 1.0, ["[executors.lcoal]", "did you mean 'local'"]),
        ("default_executor", "daks", ["default_executor = 'daks'", "did you mean 'dask'"]),
        ("defualt_executor", "local", ["no config key", "did you mean 'default_executor'"]),
        ("executors.local", 3, ["must look like 'executors.NAME.SETTING'"]),
        ("executors.local.grace", object(), ["wrong type"]),
        ("executors.local.capture_output", [1, 2], ["wrong type", "bool"]),
    ],
)
def test_a_bad_change_is_refused_and_nothing_is_written(cfg, key, value, words):
    ct.set_config("executors.local.workers", 1)
    before = cfg.read_bytes()
    with pytest.raises(ct.ConfigError) as info:
        ct.set_config(key, value)
    for w in words:
        assert w in str(info.value)
    assert cfg.read_bytes() == before
    assert not [p for p in cfg.parent.iterdir() if p.name.endswith(".tmp")]


def test_set_config_needs_a_value_or_a_dict(cfg):
    with pytest.raises(ct.ConfigError, match="needs a value"):
        ct.set_config("executors.local.grace")
    with pytest.raises(ct.ConfigError, match="takes a dotted key"):
        ct.set_config(42)


def test_covalent_keys_are_ignored_with_a_warning_not_written(cfg):
    with pytest.warns(CovalentSettingWarning, match="ignores it"):
        ct.set_config("enable_logging", "true")
    with pytest.warns(CovalentSettingWarning):
        ct.set_config({"enable_logging": "true", "log_level": "debug"})
    assert not cfg.exists() or _read(cfg) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ct.set_config("dispatcher.results_dir", str(cfg.parent / "res"))  # a real equivalent
    assert _read(cfg) == {"results_dir": str(cfg.parent / "res")}


def test_reload_config_sees_a_direct_edit(cfg):
    ct.set_config("executors.local.grace", 2.0)
    assert ct.get_config("executors.local.grace") == 2.0
    cfg.write_text("[executors.local]\ngrace = 3.0\n")
    ct.reload_config()
    assert ct.get_config("executors.local.grace") == 3.0
    cfg.write_text("[executors.local\n")
    with pytest.raises(ct.ConfigError, match="not valid TOML"):
        ct.reload_config()


def test_strings_survive_the_round_trip(cfg):
    from valent.config import load_config

    tricky = 'C:\\dir "quoted"\ttab \x7f ü'
    ct.set_config("results_dir", tricky)
    assert _read(cfg)["results_dir"] == tricky == load_config()["results_dir"]


def test_without_valent_config_it_writes_the_user_config_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    ct.set_config("executors.local.workers", 2)
    path = tmp_path / "xdg" / "valent" / "config.toml"
    assert _read(path) == {"executors": {"local": {"workers": 2}}}
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_concurrent_writers_lose_no_update(cfg):
    """Two processes each set their own keys many times: every key is there at the end."""
    cfg.parent.mkdir()
    script = textwrap.dedent("""
        import sys, valent as ct
        key = sys.argv[1]
        for i in range(25):
            ct.set_config(key, i + 1)
    """)
    env = {**os.environ, "VALENT_CONFIG": str(cfg)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, key], env=env)
        for key in ("executors.local.workers", "executors.dask.n_workers")
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0
    assert _read(cfg) == {"executors": {"local": {"workers": 25}, "dask": {"n_workers": 25}}}


def test_a_setting_made_with_set_config_reaches_the_executor(cfg, tmp_path):
    ct.set_config({"executors.local.workers": 1, "executors.local.grace": 0.25})
    script = textwrap.dedent("""
        import json, valent as ct
        from valent.api import get_dispatcher

        @ct.electron(executor="local")
        def add(a, b):
            return a + b

        @ct.lattice
        def workflow(x):
            return add(x, 1)

        r = ct.dispatch_sync(workflow)(41)
        ex = get_dispatcher().named_executor("local")
        print(json.dumps([r.status, r.result, ex.workers, ex.grace]))
    """)
    env = {**os.environ, "VALENT_CONFIG": str(cfg), "VALENT_RESULTS_DIR": str(tmp_path / "r")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["COMPLETED", 42, 1, 0.25]
