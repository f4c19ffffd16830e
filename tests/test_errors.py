"""Every error a user can cause: a clear valent exception that names the problem and the fix."""

from __future__ import annotations

import threading
import uuid

import pytest
import valent as ct


@ct.electron
def use(x, y=None):
    return x


@ct.electron
def returns_a_lock():
    return threading.Lock()


@ct.electron
def after(x):
    return x


def plain(x):
    return x


def test_unknown_executor_name_at_decoration_lists_installed_names():
    with pytest.raises(ct.UnknownExecutorError) as info:
        ct.electron(executor="lcoal")(plain)
    msg = str(info.value)
    assert "'lcoal'" in msg and "'local'" in msg and "installed executors" in msg
    assert "local" in info.value.installed
    assert isinstance(info.value, ct.ValentError)
    with pytest.raises(ct.UnknownExecutorError, match="'local'"):
        ct.lattice(executor="nope")(plain)


def test_unknown_dispatch_id():
    missing = str(uuid.uuid4())
    for call in (ct.get_result, ct.cancel):
        with pytest.raises(ct.UnknownDispatchError) as info:
            call(missing)
        assert missing in str(info.value) and "VALENT_RESULTS_DIR" in str(info.value)
        assert isinstance(info.value, ct.ValentError) and isinstance(info.value, LookupError)
    with pytest.raises(ct.UnknownDispatchError):
        ct.get_result(missing, wait=True, timeout=1)


@pytest.mark.parametrize("where", ["inside", "lattice-argument", "kwarg", "in-a-list"])
def test_unpicklable_argument_is_refused_by_dispatch_naming_node_and_argument(where):
    @ct.lattice
    def inside(n):
        return use(n, threading.Lock())

    @ct.lattice
    def lattice_argument(lock):
        return use(1, lock)

    @ct.lattice
    def kwarg(n):
        return use(n, y=threading.Lock())

    @ct.lattice
    def in_a_list(n):
        return use([after(n), threading.Lock()])

    lat, arg = {
        "inside": (inside, 1),
        "lattice-argument": (lattice_argument, threading.Lock()),
        "kwarg": (kwarg, 1),
        "in-a-list": (in_a_list, 1),
    }[where]
    with pytest.raises(ct.PicklingError) as info:
        ct.dispatch(lat)(arg)
    msg = str(info.value)
    assert "cannot be pickled" in msg
    if where == "kwarg":
        assert "argument 'y' of use(0)" in msg
    elif where == "in-a-list":
        assert ":electron_list:" in msg  # the list node that holds it
    else:
        assert "argument 2 of use(0)" in msg
    assert "lock" in msg
    assert isinstance(info.value, ct.ValentError)


def test_nothing_is_stored_for_a_refused_dispatch(results_dir):
    @ct.lattice
    def wf(n):
        return use(n, threading.Lock())

    with pytest.raises(ct.PicklingError):
        ct.dispatch(wf)(1)
    from valent._store import get_store

    assert get_store().list_dispatches() == []


def test_unpicklable_return_value_fails_the_node_and_says_so():
    @ct.lattice
    def wf():
        return after(returns_a_lock())

    result = ct.dispatch_sync(wf)()
    assert result.status == "FAILED"
    node = result.get_node_result(0)
    assert node["status"] == "FAILED"
    assert "return value" in node["error"] and "cannot be pickled" in node["error"]
    assert "lock" in node["error"]
    assert result.get_node_result(1)["reason"] == "upstream"


def test_dispatching_an_electron_or_a_plain_function_is_refused():
    with pytest.raises(ct.ValentError, match=r"takes a @lattice, got the electron 'use'"):
        ct.dispatch(use)
    with pytest.raises(ct.ValentError, match="decorated with @ct.lattice"):
        ct.dispatch(plain)
    with pytest.raises(ct.ValentError, match="dispatch_sync"):
        ct.dispatch_sync(use)


def test_bad_config_is_a_config_error_from_dispatch(tmp_path, monkeypatch):
    """One end-to-end case; tests/test_config.py has the rest."""
    cfg = tmp_path / "config.toml"
    cfg.write_text('default_executer = "local"\n')
    monkeypatch.setenv("VALENT_CONFIG", str(cfg))

    @ct.lattice
    def wf(n):
        return use(n)

    with pytest.raises(ct.ConfigError) as info:
        ct.dispatch(wf)(1)
    assert str(cfg) in str(info.value) and "default_executer" in str(info.value)


def test_error_classes_have_one_root():
    for name in (
        "ConfigError", "DispatchTimeoutError", "ExecutorError", "PicklingError", "PluginError",
        "StoreError", "TaskTimeoutError", "TracingError", "UnknownDispatchError",
        "UnknownExecutorError", "WorkerDiedError",
    ):
        assert issubclass(getattr(ct, name), ct.ValentError), name
