"""The config file (VALENT_CONFIG=path, TOML): what it sets, and ConfigError for what is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import valent as ct
from valent import config


@ct.electron
def pid_of_worker():
    return os.getpid()


@ct.lattice
def wf():
    return pid_of_worker()


def _use(monkeypatch, tmp_path, text: str):
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(text))
    monkeypatch.setenv("VALENT_CONFIG", str(path))
    return path


@pytest.mark.parametrize(
    "text, words",
    [
        ('default_executer = "local"\n', ["unknown top-level key", "default_executer"]),
        ("default_executor = 3\n", ["default_executor = 3", "wrong type"]),
        ("results_dir = 5\n", ["results_dir = 5", "wrong type"]),
        ('default_executor = "nope"\n', ["default_executor = 'nope'", "local"]),
        ("[executors.local]\nworker = 2\n", ["[executors.local]", "unknown key 'worker'",
                                             "workers"]),
        ('[executors.local]\nworkers = "two"\n', ["[executors.local]", "workers = 'two'",
                                                  "wrong type", "int"]),
        ("[executors.local]\ngrace = true\n", ["grace = True", "wrong type"]),
        ("executors = 3\n", ["[executors] must hold tables"]),
        ("default_executor = \n", ["not valid TOML"]),
        ("[executors.local\n", ["not valid TOML"]),
    ],
    ids=[
        "misspelled-key", "wrong-type-default", "wrong-type-results-dir", "unknown-executor",
        "misspelled-executor-key", "wrong-type-executor-key", "bool-for-float", "not-a-table",
        "invalid-toml-value", "invalid-toml-header",
    ],
)
def test_bad_config_raises_config_error_naming_file_and_key(monkeypatch, tmp_path, text, words):
    path = _use(monkeypatch, tmp_path, text)
    with pytest.raises(ct.ConfigError) as info:
        ct.dispatch(wf)()
    msg = str(info.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, (w, msg)


def test_missing_config_file_named_by_env(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere.toml"
    monkeypatch.setenv("VALENT_CONFIG", str(missing))
    with pytest.raises(ct.ConfigError, match="does not exist"):
        config.load_config()


def test_no_config_file_is_fine():
    assert config.load_config() == {}
    assert config.default_executor_name() == "local"


def test_config_sets_results_dir_and_default_executor(monkeypatch, tmp_path):
    store_dir = tmp_path / "from-config"
    _use(monkeypatch, tmp_path, f'results_dir = "{store_dir}"\ndefault_executor = "local"\n')
    monkeypatch.delenv("VALENT_RESULTS_DIR")
    assert config.results_dir() == store_dir
    result = ct.dispatch_sync(wf)()
    assert result.status == "COMPLETED"
    assert result.results_dir == str(store_dir)
    assert (store_dir / "valent.db").exists()
    assert result.get_node_result(0)["executor"] == "local"
    monkeypatch.setenv("VALENT_RESULTS_DIR", str(tmp_path / "env"))  # the env var wins
    assert config.results_dir() == tmp_path / "env"


def test_config_file_is_reread_when_it_changes(monkeypatch, tmp_path):
    path = _use(monkeypatch, tmp_path, 'default_executor = "local"\n')
    assert config.default_executor_name() == "local"
    path.write_text('default_executor = "nope"\n')
    os.utime(path, (1, 1))  # a different mtime even within the clock's resolution
    with pytest.raises(ct.ConfigError):
        config.default_executor_name()


def test_a_change_of_the_variables_that_choose_the_file_is_seen_at_once(monkeypatch, tmp_path):
    """The config file's path is remembered per value of the variables that choose it
    (``VALENT_CONFIG``, ``XDG_CONFIG_HOME``, ``HOME``): changing any is seen by the next
    dispatch, and so is a file appearing, changing or going away."""
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    assert config.config_path() == xdg / "valent" / "config.toml"
    assert config.default_executor_name() == "local"  # no file there yet
    (xdg / "valent").mkdir(parents=True)
    (xdg / "valent" / "config.toml").write_text('default_executor = "nope"\n')
    with pytest.raises(ct.ConfigError, match="nope"):
        ct.dispatch(wf)()
    other = tmp_path / "other-xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(other))  # another folder: its (absent) file
    assert config.config_path() == other / "valent" / "config.toml"
    assert config.default_executor_name() == "local"
    named = tmp_path / "named.toml"
    named.write_text('default_executor = "nope2"\n')
    monkeypatch.setenv("VALENT_CONFIG", str(named))  # the variable wins over the folder
    with pytest.raises(ct.ConfigError, match="nope2"):
        config.default_executor_name()
    monkeypatch.setenv("VALENT_CONFIG", "~/cfg.toml")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config.config_path() == tmp_path / "home" / "cfg.toml"
    monkeypatch.setenv("HOME", str(tmp_path / "home2"))
    assert config.config_path() == tmp_path / "home2" / "cfg.toml"
    monkeypatch.delenv("VALENT_CONFIG")
    monkeypatch.delenv("XDG_CONFIG_HOME")
    if sys.platform.startswith("linux"):  # platformdirs' folder under HOME on Linux
        assert config.config_path() == tmp_path / "home2" / ".config" / "valent" / "config.toml"
    named.unlink()
    monkeypatch.setenv("VALENT_CONFIG", str(named))  # the file it names went away
    with pytest.raises(ct.ConfigError, match="does not exist"):
        config.load_config()


def test_executor_table_reaches_the_executor(tmp_path):
    """In a fresh process (this one's dispatcher already made its "local" executor)."""
    cfg = tmp_path / "config.toml"
    cfg.write_text("[executors.local]\nworkers = 3\ngrace = 0.25\n")
    code = textwrap.dedent(
        """
        import os
        import valent as ct
        from valent.api import get_dispatcher

        @ct.electron
        def f():
            return os.getpid()

        @ct.lattice
        def wf():
            return f()

        r = ct.dispatch_sync(wf)()
        ex = get_dispatcher().named_executor("local")
        print(r.status, ex.workers, ex.grace, len(ex.pool.worker_pids()))
        """
    )
    env = dict(os.environ, VALENT_CONFIG=str(cfg))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["COMPLETED", "3", "0.25", "3"]
