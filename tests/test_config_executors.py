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
from valent.checks import Seconds
from valent.config import executor_from_config, validate_executor
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


# ------------------------------------------------- one check, the same everywhere (#18)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("grace = nan", ["grace = nan", "not a finite number", ">= 0"]),  # cancel never ended
        ("grace = inf", ["grace = inf", "not a finite number"]),
        ("grace = -1.0", ["grace = -1.0", "less than 0"]),
        ("grace = 1e10", ["grace = 10000000000.0", "more than 31536000"]),
        ("max_workers = 0", ["max_workers = 0", "whole number >= 1"]),  # every node failed
        ("workers = -3", ["workers = -3", "whole number >= 1"]),
        ("grce = 2", ["unknown key 'grce'", "did you mean 'grace'"]),
    ],
)
def test_bad_values_fail_dispatch_at_once_naming_key_problem_and_fix(config, line, words):
    path = config(f"[executors.local]\n{line}\n")
    with pytest.raises(ct.ConfigError) as info:
        ct.dispatch(workflow)(1)
    msg = str(info.value)
    assert str(path) in msg and "[executors.local]" in msg
    for w in words:
        assert w in msg
    with pytest.raises(ct.ConfigError):  # the same check when the executor is made
        executor_from_config("local", LocalExecutor)


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ("[executors.dask]\ncancel_mode = 'kil'\n", ["cancel_mode = 'kil'", "'kill'"]),
        ("[executors.dask]\nconnect_timeout = 0\n", ["connect_timeout = 0", "> 0"]),
        ("[executors.ssh]\nhostname = 'h'\nport = 70000\n", ["port = 70000", "<= 65535"]),
        ("[executors.ssh]\nhostname = 'h'\nmax_parallel = 0\n", ["max_parallel = 0", ">= 1"]),
    ],
)
def test_every_builtin_executor_declares_its_bounds(config, table, words):
    config(table)
    name = table.split(".")[1].split("]")[0]
    with pytest.raises(ct.ConfigError) as info:
        validate_executor(name)
    for w in words:
        assert w in str(info.value)


def test_an_elastic_ceiling_below_the_cpu_count_works(config):
    """max_workers = 1 on a machine with more CPUs once failed every node (the elastic
    pool's floor, the CPU count, was above its ceiling)."""
    config("[executors.local]\nmax_workers = 1\n")
    ex = executor_from_config("local", LocalExecutor)
    inc = ct.electron(executor=ex)(lambda x: x + 1)

    @ct.lattice
    def one(x):
        return inc(x)

    try:
        r = ct.dispatch_sync(one)(1)
        assert r.status == ct.Status.COMPLETED, r.error
        assert r.result == 2 and ex.pool.max_workers == 1
    finally:
        ex.shutdown()


class Refuses(LocalExecutor):
    """An executor whose __init__ fails the way a real one can (a check of its own)."""

    name = "refuses"

    def __init__(self, region: str = "eu", **kwargs):
        if region not in ("eu", "us"):
            raise RuntimeError(f"no such region {region!r}")
        super().__init__(**kwargs)


def test_any_error_from_init_is_a_config_error_naming_the_table(config, monkeypatch):
    path = config("[executors.refuses]\nregion = 'mars'\n")
    with pytest.raises(ct.ConfigError) as info:
        executor_from_config("refuses", Refuses)
    msg = str(info.value)
    assert str(path) in msg and "[executors.refuses]" in msg
    assert "Refuses(region='mars') failed: RuntimeError: no such region 'mars'" in msg


def test_validate_executor_fails_at_once_for_a_named_executor(config):
    """What dispatch calls per executor a graph names: a missing required setting or an
    __init__ error is a ConfigError now, not a failure of every node later."""
    with pytest.raises(ct.ConfigError, match=r"needs the setting\(s\) hostname"):
        validate_executor("ssh")  # no [executors.ssh] table: was a bare TypeError
    path = config("[executors.ssh]\nhostname = ''\n")
    with pytest.raises(ct.ConfigError, match="hostname must be a non-empty string") as info:
        validate_executor("ssh")
    assert str(path) in str(info.value)
    with pytest.raises(ct.UnknownExecutorError):
        validate_executor("lcoal")
    config("[executors.local]\nworkers = 1\n")
    ex = validate_executor("local")
    assert isinstance(ex, LocalExecutor) and ex.workers == 1


class Lax(LocalExecutor):
    """A third-party executor that declares its bounds but does not check them itself."""

    name = "lax"

    def __init__(self, grace: Seconds = 1.0):
        super().__init__()
        self.grace = grace


def test_validate_executor_checks_an_instance_made_in_python():
    with pytest.raises(ct.ConfigError, match="grace = nan: nan is not a finite number"):
        validate_executor(Lax(grace=float("nan")))
    good = LocalExecutor(workers=1)
    assert validate_executor(good) is good


def test_builtin_executors_refuse_bad_numbers_when_made_in_python():
    """(nan < 0 is False: `if grace < 0` let nan through; a bool is an int.)"""
    from valent_dask import DaskExecutor
    from valent_ssh import SSHExecutor

    for make, words in [
        (lambda: LocalExecutor(grace=float("nan")), "LocalExecutor(grace=...): nan"),
        (lambda: LocalExecutor(max_workers=0), "LocalExecutor(max_workers=...): 0"),
        (lambda: LocalExecutor(workers=True), "LocalExecutor(workers=...): True"),
        (lambda: DaskExecutor(grace=float("nan")), "DaskExecutor(grace=...): nan"),
        (lambda: DaskExecutor(connect_timeout=float("inf")), "connect_timeout=...): inf"),
        (lambda: SSHExecutor("h", grace=float("nan")), "SSHExecutor(grace=...): nan"),
        (lambda: SSHExecutor("h", port=True), "SSHExecutor(port=...): True"),
    ]:
        with pytest.raises((ValueError, ct.ValentError)) as info:
            make()
        assert words in str(info.value)
