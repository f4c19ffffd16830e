"""``[executors.NAME]`` in the config file, through the public path: VALENT_CONFIG + dispatch.

Checked against the executor's settings (its ``__init__``): a misspelled key, a wrong type
or a value the executor rejects is a ``ConfigError`` naming the file and the key. The config
is only read, never written, and the results store keeps only the executor's name.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest
import valent as ct
from valent.config import executor_from_config
from valent_local import LocalExecutor


@ct.electron(executor="local")
def add(a: int, b: int) -> int:
    return a + b


@ct.lattice
def workflow(x: int) -> int:
    return add(x, 1)


@pytest.fixture
def config(tmp_path, monkeypatch):
    """``config(text)`` writes a TOML file and points VALENT_CONFIG at it."""

    def write(text: str):
        path = tmp_path / "valent.toml"
        path.write_text(textwrap.dedent(text))
        monkeypatch.setenv("VALENT_CONFIG", str(path))
        return path

    return write


def test_misspelled_key_names_file_key_and_the_valid_keys(config):
    path = config("""
        [executors.local]
        worker = 2
    """)
    with pytest.raises(ct.ConfigError) as info:
        ct.dispatch(workflow)(1)
    msg = str(info.value)
    assert str(path) in msg and "[executors.local]" in msg and "'worker'" in msg
    assert "workers" in msg and "grace" in msg  # what it does accept


def test_wrong_type_names_file_key_and_expected_type(config):
    path = config("""
        [executors.local]
        workers = "two"
    """)
    with pytest.raises(ct.ConfigError, match="workers = 'two' has the wrong type") as info:
        ct.dispatch(workflow)(1)
    assert str(path) in str(info.value) and "int" in str(info.value)


@pytest.mark.parametrize(
    ("line", "good"),
    [
        ("grace = 1", True),  # an int where a float is expected is fine
        ("grace = true", False),  # a bool is not a number here
        ("max_workers = 3.5", False),
        ("capture_output = 'yes'", False),
        ("workers = 2", True),
    ],
)
def test_types_follow_the_annotations(config, line, good):
    config(f"[executors.local]\n{line}\n")
    if good:
        assert isinstance(executor_from_config("local", LocalExecutor), LocalExecutor)
    else:
        with pytest.raises(ct.ConfigError, match="wrong type"):
            executor_from_config("local", LocalExecutor)


def test_value_the_executor_rejects_is_a_config_error(config):
    path = config("""
        [executors.local]
        workers = 0
    """)
    with pytest.raises(ct.ConfigError, match=r"\[executors.local\].*workers") as info:
        executor_from_config("local", LocalExecutor)
    assert str(path) in str(info.value)


def test_bad_toml_and_unknown_top_level_key(config):
    path = config("[executors.local\n")
    with pytest.raises(ct.ConfigError, match="not valid TOML") as info:
        ct.dispatch(workflow)(1)
    assert str(path) in str(info.value)
    config("defualt_executor = 'local'\n")
    with pytest.raises(ct.ConfigError, match="unknown top-level key.*defualt_executor"):
        ct.dispatch(workflow)(1)


def test_missing_file_named_by_env_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VALENT_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ct.ConfigError, match="nope.toml.*does not exist"):
        ct.dispatch(workflow)(1)


def test_settings_reach_the_executor_and_the_file_is_never_written(tmp_path):
    """In a fresh process (the dispatcher keeps one executor per name per process)."""
    cfg = tmp_path / "valent.toml"
    cfg.write_text("[executors.local]\nworkers = 1\ngrace = 0.25\n")
    before = (cfg.read_bytes(), cfg.stat().st_mtime_ns)
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
    env = {**os.environ, "VALENT_CONFIG": str(cfg), "VALENT_RESULTS_DIR": str(tmp_path / "r"),
           "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["COMPLETED", 42, 1, 0.25]
    assert (cfg.read_bytes(), cfg.stat().st_mtime_ns) == before
    assert not (tmp_path / "xdg").exists(), "valent created a config dir behind the user's back"


class TokenExecutor(LocalExecutor):
    """An executor with a secret setting, used as an instance (never registered)."""

    name = "tokenlocal"

    def __init__(self, api_token: str = "", **kwargs):
        super().__init__(**kwargs)
        self.api_token = api_token


def test_store_keeps_only_the_executor_name(results_dir):
    secret = "s3cr3t-token-4f9a"
    ex = TokenExecutor(api_token=secret, workers=1)

    @ct.electron(executor=ex)
    def double(x: int) -> int:
        return 2 * x

    @ct.lattice
    def secret_flow(x: int) -> int:
        return double(x)

    try:
        result = ct.dispatch_sync(secret_flow)(21)
    finally:
        ex.shutdown()
    assert result.status == ct.Status.COMPLETED and result.result == 42
    db = results_dir / "valent.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(FULL)")
        executors = {r[0] for r in conn.execute("SELECT executor FROM nodes")}
    assert executors == {"tokenlocal", None}
    for f in results_dir.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f"the secret leaked into {f}"
