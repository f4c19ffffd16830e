"""deps_bash / deps_pip / call_before / call_after: run in the task's process, cancelled with it.

Real dispatches on a fresh LocalExecutor (its workers inherit this test's environment, so
``VALENT_DEPS_CACHE`` points into the test's tmp dir). The pip tests install a wheel the test
builds itself, from a local folder (``--no-index --find-links``): no network.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import valent as ct
from core_support import read_pid, wait_gone, wait_until
from valent.deps import DepsPip

# ---------------------------------------------------------------------- helpers


def make_wheel(folder: Path, name: str = "valentdummy", version: str = "1.0") -> Path:
    """A pure-Python wheel of a one-module package whose VALUE names its version."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VALUE = 'dummy {version}'\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: valent-tests\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
    }
    record = []
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


@pytest.fixture
def deps_cache(tmp_path, monkeypatch):
    cache = tmp_path / "deps-cache"
    monkeypatch.setenv("VALENT_DEPS_CACHE", str(cache))
    return cache


@pytest.fixture
def wheels(tmp_path):
    folder = tmp_path / "wheels"
    make_wheel(folder)
    return folder


def _dummy():
    import valentdummy

    return valentdummy.VALUE, valentdummy.__file__


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------------- call_before / after


def test_call_before_and_after_with_retval_keyword(tmp_path, local_executor):
    """Covalent's how-to: call_before writes a file whose name the task gets as my_file,
    call_after removes it."""
    target = str(tmp_path / "test.txt")

    def call_before_hook(filename):
        Path(filename).write_text("Hello world!")
        return filename

    def call_after_hook(filename):
        Path(filename).unlink()

    @ct.electron(
        call_before=ct.DepsCall(call_before_hook, args=(target,), retval_keyword="my_file"),
        call_after=ct.DepsCall(call_after_hook, args=(target,)),
    )
    def read_from_file(my_file=None):
        with open(my_file) as f:
            return f.read()

    @ct.lattice(executor=local_executor)
    def workflow():
        return read_from_file()

    dispatch_id = ct.dispatch(workflow)()
    r = ct.get_result(dispatch_id, wait=True)
    assert r.status == ct.Status.COMPLETED, r.error
    assert r.result == "Hello world!"
    assert not Path(target).exists()  # call_after ran
    assert [n["node_name"] for n in r.get_all_node_results()] == ["read_from_file"]


def test_steps_run_in_order_in_the_task_process(tmp_path, local_executor):
    log = tmp_path / "log"

    def note(what):
        with open(log, "a") as f:
            f.write(f"{what} {os.getpid()}\n")
        return what

    @ct.electron(
        deps_bash=[f"echo bash $PPID >> {log}"],
        call_before=[
            ct.DepsCall(note, args=("before1",)),
            ct.DepsCall(note, kwargs={"what": "before2"}, retval_keyword="got"),
        ],
        call_after=[ct.DepsCall(note, args=("after",))],
    )
    def body(x, got=None):
        note(f"body-{got}")
        return x * 2, os.getpid()

    @ct.lattice(executor=local_executor)
    def workflow(x):
        return body(x, got="ignored: the call_before's value wins")

    r = ct.dispatch_sync(workflow)(21)
    assert r.status == ct.Status.COMPLETED, r.error
    value, task_pid = r.result
    assert value == 42
    lines = [line.split() for line in log.read_text().splitlines()]
    assert [w for w, _ in lines] == ["bash", "before1", "before2", "body-before2", "after"]
    assert {int(p) for _, p in lines} == {task_pid}  # bash's parent is the task's process
    assert task_pid != os.getpid()


def test_electron_outside_a_lattice_is_a_plain_call_without_its_steps(tmp_path):
    marker = tmp_path / "ran"

    @ct.electron(call_before=ct.DepsCall(marker.write_text, args=("x",)))
    def plain(a):
        return a + 1

    assert plain(1) == 2 and not marker.exists()


def test_a_failing_call_before_fails_the_task_and_names_the_hook(local_executor):
    def broken():
        raise ValueError("setup went wrong")

    @ct.electron(call_before=ct.DepsCall(broken))
    def task():
        return 1

    @ct.lattice(executor=local_executor)
    def workflow():
        return task()

    r = ct.dispatch_sync(workflow)()
    assert r.status == ct.Status.FAILED
    node = r.get_node_result(0)
    assert "ValueError: setup went wrong" in node["error"]
    assert "call_before broken of electron task" in node["traceback"]


def test_bad_hook_arguments_are_clear_errors():
    with pytest.raises(ct.ValentError, match="call_before takes ct.DepsCall"):
        ct.electron(call_before=print)(lambda: 1)
    with pytest.raises(ct.ValentError, match="deps_bash must be"):
        ct.electron(deps_bash=42)(lambda: 1)
    with pytest.raises(ct.ValentError, match="reserved"):
        ct.DepsCall(print, retval_keyword="files")
    with pytest.raises(ct.ValentError, match="requirements file"):
        ct.DepsPip(reqs_path="/nonexistent/requirements.txt")
    with pytest.raises(ct.ValentError, match="both are empty"):
        ct.DepsPip()


# ---------------------------------------------------------------------- DepsBash


def test_deps_bash_as_object_and_as_list(tmp_path, local_executor):
    """Covalent's how-to, with the file in the test's tmp dir."""
    path = tmp_path / "path.txt"

    @ct.electron(deps_bash=ct.DepsBash([f"echo `whereis sh` > {path}"]))
    def get_bash_result():
        with open(path) as f:
            return f.read()

    @ct.electron(deps_bash=[f"echo listed >> {path}"])
    def get_bash_result_2():
        with open(path) as f:
            return f.read()

    @ct.lattice(executor=local_executor)
    def workflow():
        return get_bash_result()

    @ct.lattice(executor=local_executor)
    def workflow_2():
        return get_bash_result_2()

    r = ct.get_result(ct.dispatch(workflow)(), wait=True)
    assert r.status == ct.Status.COMPLETED, r.error
    assert r.result.startswith("sh: /")
    r2 = ct.dispatch_sync(workflow_2)()
    assert r2.result.splitlines()[-1] == "listed"


def test_a_failing_bash_command_fails_the_task_with_its_output(local_executor):
    @ct.electron(deps_bash=["echo fine", "echo 'no such tool' >&2; exit 3"])
    def task():
        return 1

    @ct.lattice(executor=local_executor)
    def workflow():
        return task()

    r = ct.dispatch_sync(workflow)()
    assert r.status == ct.Status.FAILED
    err = r.get_node_result(0)["error"]
    assert "DependencyError" in err and "exited with status 3" in err and "no such tool" in err
    assert "fine" in r.get_node_result(0)["stdout"]


# ---------------------------------------------------------------------- DepsPip


def test_deps_pip_installs_into_a_cached_dir_not_the_environment(
    tmp_path, wheels, deps_cache, local_executor
):
    reqs = tmp_path / "requirements_example.txt"
    reqs.write_text(f"--no-index\n--find-links {wheels}\nvalentdummy==1.0\n")

    @ct.electron(deps_pip=ct.DepsPip(reqs_path=str(reqs)))
    def with_reqs():
        return _dummy()

    @ct.electron(deps_pip=ct.DepsPip(packages=["valentdummy==1.0"],
                                     pip_args=["--no-index", "--find-links", str(wheels)]))
    def with_packages():
        return _dummy()

    @ct.electron
    def without():
        return _importable("valentdummy")

    @ct.lattice(executor=local_executor)
    def workflow():
        return [with_reqs(), with_packages(), without()]

    r = ct.dispatch_sync(workflow)()
    assert r.status == ct.Status.COMPLETED, r.error
    (v1, f1), (v2, f2), seen_without = r.result
    assert v1 == v2 == "dummy 1.0"
    assert f1.startswith(str(deps_cache)) and f2.startswith(str(deps_cache))
    assert not seen_without  # a task without the deps does not see them
    assert not _importable("valentdummy")  # nor does this environment
    # a second dispatch reuses the installed sets: nothing is installed again
    built = sorted(p.name for p in deps_cache.iterdir() if p.is_dir())
    r2 = ct.dispatch_sync(workflow)()
    assert r2.status == ct.Status.COMPLETED, r2.error
    assert sorted(p.name for p in deps_cache.iterdir() if p.is_dir()) == built
    assert all("installed" not in n["stderr"] for n in r2.get_all_node_results())


def test_the_same_worker_runs_a_later_task_without_the_set(wheels, deps_cache):
    ex = ct.executors.LocalExecutor(workers=1)
    dep = ct.DepsPip(["valentdummy==1.0"], pip_args=["--no-index", "--find-links", str(wheels)])

    @ct.electron(deps_pip=dep)
    def first():
        import valentdummy

        return os.getpid(), valentdummy.VALUE

    @ct.electron
    def second(_):
        return os.getpid(), "valentdummy" in sys.modules, _importable("valentdummy")

    @ct.lattice(executor=ex)
    def workflow():
        return [first(), second(first())]

    try:
        r = ct.dispatch_sync(workflow)()
    finally:
        pids = ex.pool.worker_pids()
        ex.shutdown()
        assert wait_gone(pids) == []
    assert r.status == ct.Status.COMPLETED, r.error
    (pid1, value), (pid2, loaded, importable) = r.result
    assert value == "dummy 1.0" and pid1 == pid2  # one worker ran both
    assert not loaded and not importable


def test_parallel_tasks_build_a_set_once(wheels, deps_cache, local_executor):
    dep = ct.DepsPip(["valentdummy==1.0"], pip_args=["--no-index", "--find-links", str(wheels)])

    @ct.electron(deps_pip=dep)
    def task(i):
        import valentdummy

        return i, valentdummy.VALUE

    @ct.lattice(executor=local_executor)
    def workflow():
        return [task(i) for i in range(2)]

    r = ct.dispatch_sync(workflow)()
    assert r.status == ct.Status.COMPLETED, r.error
    assert r.result == [(0, "dummy 1.0"), (1, "dummy 1.0")]
    nodes = [n for n in r.get_all_node_results() if n["node_name"] == "task"]
    assert sum("valent: installed valentdummy==1.0" in n["stderr"] for n in nodes) == 1
    assert len([p for p in deps_cache.iterdir() if p.is_dir()]) == 1


def test_a_satisfied_requirement_installs_nothing(tmp_path, local_executor):
    cache = tmp_path / "never"
    import cloudpickle

    dep = ct.DepsPip([f"cloudpickle=={cloudpickle.__version__}"], cache_dir=str(cache))
    assert dep.satisfied()
    assert not ct.DepsPip(["cloudpickle<0.1"]).satisfied()
    assert not ct.DepsPip(["valent-surely-not-installed"]).satisfied()

    @ct.electron(deps_pip=dep)
    def task():
        import cloudpickle as cp

        return cp.__file__

    @ct.lattice(executor=local_executor)
    def workflow():
        return task()

    r = ct.dispatch_sync(workflow)()
    assert r.status == ct.Status.COMPLETED, r.error
    assert not cache.exists()
    assert r.result == cloudpickle.__file__


def test_a_pip_failure_names_the_package(tmp_path, deps_cache, local_executor):
    empty = tmp_path / "empty"
    empty.mkdir()

    @ct.electron(
        deps_pip=ct.DepsPip(
            ["valent-no-such-package==1.0"], pip_args=["--no-index", "--find-links", str(empty)]
        )
    )
    def task():
        return 1

    @ct.lattice(executor=local_executor)
    def workflow():
        return task()

    r = ct.dispatch_sync(workflow)()
    assert r.status == ct.Status.FAILED
    err = r.get_node_result(0)["error"]
    assert "DependencyError" in err and "pip could not install" in err
    assert "'valent-no-such-package==1.0'" in err
    # nothing half-built is left to be taken for a finished set
    assert not [p for p in deps_cache.iterdir() if p.is_dir()]


def test_deps_pip_in_call_before_as_in_covalents_how_to(tmp_path, wheels, deps_cache,
                                                         local_executor):
    reqs = tmp_path / "requirements_example.txt"
    reqs.write_text(f"--no-index\n--find-links {wheels}\nvalentdummy==1.0")
    deps_dummy = ct.DepsPip(reqs_path=str(reqs))

    @ct.electron(call_before=[deps_dummy])
    def get_result():
        import valentdummy

        return valentdummy.VALUE

    @ct.lattice(executor=local_executor)
    def workflow():
        return get_result()

    res = ct.get_result(ct.dispatch(workflow)(), wait=True)
    assert res.status == ct.Status.COMPLETED, res.error
    assert res.result == "dummy 1.0"


def test_digest_depends_on_the_set_only():
    a = DepsPip(["x==1"], cache_dir="/a")
    assert a.digest() == DepsPip(["x==1"], cache_dir="/b").digest()
    assert a.digest() != DepsPip(["x==2"]).digest()
    assert a.digest() != DepsPip(["x==1"], pip_args=["--pre"]).digest()


# ---------------------------------------------------------------------- cancel


@pytest.mark.parametrize("where", ["deps_bash", "call_before"])
def test_cancel_during_a_step_kills_it(where, tmp_path, local_executor):
    pid_file = tmp_path / "pid"
    ran = tmp_path / "body-ran"

    def long_setup(path):
        proc = subprocess.Popen(["sleep", "30"])
        Path(path).write_text(str(proc.pid))
        proc.wait()

    hooks = (
        {"deps_bash": [f"sleep 30 & echo $! > {pid_file}; wait"]}
        if where == "deps_bash"
        else {"call_before": ct.DepsCall(long_setup, args=(str(pid_file),))}
    )

    @ct.electron(**hooks)
    def task():
        Path(ran).write_text("yes")
        return 1

    @ct.lattice(executor=local_executor)
    def workflow():
        return task()

    did = ct.dispatch(workflow)()
    pid = read_pid(pid_file, timeout=30)
    assert wait_until(lambda: ct.get_result(did).get_node_result(0)["status"] == "RUNNING", 10)
    ct.cancel(did)
    r = ct.get_result(did, wait=True, timeout=60)
    node = r.get_node_result(0)
    assert r.status == ct.Status.CANCELLED
    assert node["status"] == ct.Status.CANCELLED and node["cancel_outcome"] == "killed"
    assert wait_gone([pid]) == [], f"the {where} process {pid} outlived the cancel"
    assert not ran.exists()
    time.sleep(0.1)


def test_cancel_during_a_long_pip_build_kills_it_and_a_later_build_succeeds(
    tmp_path, deps_cache, local_executor
):
    """A local project whose in-tree build backend sleeps: pip's build runs in the task's
    process group, so the cancel kills it; the lock and the half-built directory it leaves do
    not stop the next build of the same set."""
    project = tmp_path / "slowpkg"
    project.mkdir()
    pid_file = tmp_path / "build-pid"
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "slow_backend"\nbackend-path = ["."]\n'
    )
    wheel_dir = tmp_path / "wheels"
    make_wheel(wheel_dir, "slowpkg", "1.0")
    (project / "slow_backend.py").write_text(
        "import os, shutil, time\n"
        f"PID = {str(pid_file)!r}\n"
        f"WHEEL = {str(wheel_dir / 'slowpkg-1.0-py3-none-any.whl')!r}\n"
        "def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):\n"
        "    if not os.path.exists(PID + '.done'):\n"
        "        open(PID, 'w').write(str(os.getpid()))\n"
        "        time.sleep(30)\n"
        "    shutil.copy(WHEEL, wheel_directory)\n"
        "    return os.path.basename(WHEEL)\n"
    )
    dep = ct.DepsPip([str(project)], pip_args=["--no-index"])

    @ct.electron(deps_pip=dep)
    def task():
        import slowpkg

        return slowpkg.VALUE

    @ct.lattice(executor=local_executor)
    def workflow():
        return task()

    did = ct.dispatch(workflow)()
    pid = read_pid(pid_file, timeout=60)
    ct.cancel(did)
    r = ct.get_result(did, wait=True, timeout=60)
    assert r.status == ct.Status.CANCELLED
    assert r.get_node_result(0)["cancel_outcome"] == "killed"
    assert wait_gone([pid]) == [], "pip's build outlived the cancel"
    assert not [p for p in deps_cache.iterdir() if p.is_dir() and ".tmp-" not in p.name]

    Path(str(pid_file) + ".done").write_text("")  # the next build is quick
    r2 = ct.dispatch_sync(workflow)()
    assert r2.status == ct.Status.COMPLETED, r2.error
    assert r2.result == "dummy 1.0"
    assert not [p for p in deps_cache.iterdir() if ".tmp-" in p.name]
