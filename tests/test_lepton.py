"""ct.Lepton: bash commands, C functions and Python functions by module, as Covalent's how-tos
use them; dispatched for real on a LocalExecutor; a cancelled bash lepton's processes die."""

from __future__ import annotations

import shutil
import subprocess
from ctypes import POINTER, c_int32
from pathlib import Path

import pytest
import valent as ct
from core_support import wait_gone, wait_until

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def test_bash_lepton_inputs_and_named_outputs(local_executor):
    """construct_bash_task: INPUT_OUTPUT keyword arguments and an OUTPUT, read back typed."""
    task = ct.Lepton(
        language="bash",
        command="product=$(({num_1} * {num_2}))",
        argtypes=[
            (int, ct.Lepton.INPUT_OUTPUT),
            (int, ct.Lepton.INPUT_OUTPUT),
            (int, ct.Lepton.OUTPUT),
        ],
        named_outputs=["num_1", "num_2", "product"],
        executor=local_executor,
    )

    @ct.lattice
    def bash_multiply_workflow(**kwargs) -> str:
        return task(**kwargs)

    result = ct.dispatch_sync(bash_multiply_workflow)(num_1=7, num_2=8)
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == (7, 8, 56)
    assert result.get_node_result(0)["node_name"] == "product=$(({num_1} * {num_2}))"


def _version_lepton(field: str, executor):
    return ct.Lepton(
        language="bash",
        # the how-to's command; {{ }} are literal braces once the command is formatted
        command="version=`gcc --version | awk 'NR==1 {{print $" + field + "}}'` "
        "&& IFS=. read major minor patch <<< $version",
        argtypes=[
            (str, ct.Lepton.INPUT_OUTPUT),
            (int, ct.Lepton.OUTPUT),
            (int, ct.Lepton.OUTPUT),
            (int, ct.Lepton.OUTPUT),
        ],
        named_outputs=["CPP", "major", "minor", "patch"],
        executor=executor,
    )


@needs_gcc
def test_run_bash_command_reads_gcc_version(local_executor):
    """run_bash_command: gcc's version split on dots into typed outputs. With the how-to's
    field ($3) Debian's gcc gives '12.2.0-14+deb12u1)': the node FAILS naming the output that is
    no int (Covalent's how-to ends FAILED too); the last field parses."""
    first = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout
    words = first.splitlines()[0].split()

    @ct.lattice
    def version_workflow(**kwargs) -> str:
        return _version_lepton("NF", local_executor)(**kwargs)

    result = ct.dispatch_sync(version_workflow)(CPP="gcc")
    assert result.status == ct.Status.COMPLETED, result.error
    major, minor, patch = words[-1].split(".")
    assert result.result == ("gcc", int(major), int(minor), int(patch))

    @ct.lattice
    def howto_workflow(**kwargs) -> str:
        return _version_lepton("3", local_executor)(**kwargs)

    howto = ct.dispatch_sync(howto_workflow)(CPP="gcc")
    try:
        expected = tuple(int(x) for x in words[2].split("."))
    except ValueError:
        expected = None
    if expected is None:
        assert howto.status == ct.Status.FAILED
        err = howto.get_node_result(0)["error"]
        assert "LeptonError" in err and "is not a int" in err
    else:
        assert howto.result == ("gcc", *expected)

    bad = ct.Lepton(
        language="bash", command="major=twelve", argtypes=[(int, ct.Lepton.OUTPUT)],
        named_outputs=["major"], executor=local_executor,
    )

    @ct.lattice
    def bad_workflow():
        return bad()

    failed = ct.dispatch_sync(bad_workflow)()
    assert failed.status == ct.Status.FAILED
    err = failed.get_node_result(0)["error"]
    assert "LeptonError" in err and "major='twelve'" in err and "int" in err


def test_bash_lepton_failure_and_positional_arguments(local_executor):
    echo = ct.Lepton(
        language="bash", command='out="$1-$2"', argtypes=[(str, ct.Lepton.OUTPUT)],
        named_outputs=["out"], executor=local_executor,
    )
    fail = ct.Lepton(language="bash", command="echo oops >&2; exit 4", executor=local_executor)

    @ct.lattice
    def flow():
        return echo("a b", "c")

    @ct.lattice
    def failing():
        return fail()

    assert ct.dispatch_sync(flow)().result == "a b-c"
    r = ct.dispatch_sync(failing)()
    assert r.status == ct.Status.FAILED
    assert "exited with status 4: oops" in r.get_node_result(0)["error"]


def test_python_lepton_from_a_module(tmp_path, local_executor):
    """construct_lepton: a module written to a folder that call_before puts on sys.path."""
    (tmp_path / "valent_test_module.py").write_text(
        "def entrypoint(x: int, y: int) -> int:\n    return x + y\n"
    )

    def set_pythonpath(directory):
        import sys

        print(f"Appending {directory} to module search path")
        sys.path.append(directory)

    calldep = ct.DepsCall(set_pythonpath, args=[str(tmp_path)])
    task = ct.Lepton(
        language="python",
        library_name="valent_test_module",
        function_name="entrypoint",
        call_before=[calldep],
        executor=local_executor,
    )

    @ct.lattice
    def workflow(x: int) -> int:
        return task(x, 1)

    result = ct.dispatch_sync(workflow)(2)
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == 3
    assert result.get_all_node_outputs() == {
        "entrypoint(0)": 3, ":parameter:2(1)": 2, ":parameter:1(2)": 1,
    }
    assert "Appending" in result.get_node_result(0)["stdout"]


def test_python_lepton_missing_module_is_a_clear_failure(local_executor):
    task = ct.Lepton(library_name="valent_no_such_module", function_name="f",
                     executor=local_executor)

    @ct.lattice
    def workflow():
        return task()

    r = ct.dispatch_sync(workflow)()
    assert r.status == ct.Status.FAILED
    assert "cannot import the module 'valent_no_such_module'" in r.get_node_result(0)["error"]


C_SOURCE = """
void test_entry(int x, int *y, int *z)
{
        *y += x;
        *z = 5;
}
"""


@needs_gcc
def test_c_lepton_with_its_compile_step(tmp_path, local_executor):
    """construct_c_task: y += x and z = 5 through pointers; here the library is compiled by
    the lepton's deps_bash, on the executor, before the call."""
    (tmp_path / "test.c").write_text(C_SOURCE)
    library_path = str(tmp_path / "libtest.so")
    task = ct.Lepton(
        language="C",
        library_name=library_path,
        function_name="test_entry",
        argtypes=[
            (c_int32, ct.Lepton.INPUT),
            (POINTER(c_int32), ct.Lepton.INPUT_OUTPUT),
            (POINTER(c_int32), ct.Lepton.OUTPUT),
        ],
        deps_bash=[f"gcc -shared -fPIC -o {library_path} {tmp_path / 'test.c'}"],
        executor=local_executor,
    )

    @ct.lattice
    def workflow(x: int, y: int) -> int:
        return task(x, y)

    dispatch_id = ct.dispatch(workflow)(1, 2)
    result = ct.get_result(dispatch_id, wait=True)
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == (3, 5)
    assert Path(library_path).exists()


def test_c_lepton_without_a_compiler_or_library_fails_clearly(tmp_path, local_executor):
    (tmp_path / "test.c").write_text(C_SOURCE)
    lib = str(tmp_path / "libmissing.so")
    argtypes = [(c_int32, ct.Lepton.INPUT), (POINTER(c_int32), ct.Lepton.OUTPUT)]
    no_compiler = ct.Lepton(
        "C", library_name=lib, function_name="test_entry", argtypes=argtypes,
        deps_bash=[f"valent-no-such-cc -shared -o {lib} {tmp_path / 'test.c'}"],
        executor=local_executor,
    )
    no_library = ct.Lepton(
        "C", library_name=lib, function_name="test_entry", argtypes=argtypes,
        executor=local_executor,
    )

    @ct.lattice
    def flow_1():
        return no_compiler(1)

    @ct.lattice
    def flow_2():
        return no_library(1)

    r1 = ct.dispatch_sync(flow_1)()
    assert r1.status == ct.Status.FAILED
    err = r1.get_node_result(0)["error"]
    assert "DependencyError" in err and "status 127" in err and "not found" in err
    r2 = ct.dispatch_sync(flow_2)()
    assert r2.status == ct.Status.FAILED
    err = r2.get_node_result(0)["error"]
    assert "cannot load the shared library" in err and "deps_bash" in err


def test_bad_lepton_arguments_are_clear_errors():
    with pytest.raises(ct.ValentError, match="not supported"):
        ct.Lepton("fortran", library_name="x", function_name="y")
    with pytest.raises(ct.ValentError, match="command or library_name, not both"):
        ct.Lepton("bash", command="true", library_name="x.sh")
    with pytest.raises(ct.ValentError, match="named_outputs"):
        ct.Lepton("bash", command="true", argtypes=[(int, ct.Lepton.OUTPUT)])
    with pytest.raises(ct.ValentError, match="library_name= and function_name="):
        ct.Lepton("python", library_name="x")
    with pytest.raises(ct.ValentError, match="retval_keyword"):
        ct.Lepton("bash", command="true",
                  call_before=ct.DepsCall(print, retval_keyword="k"))


def test_cancel_kills_a_running_bash_lepton(tmp_path, local_executor):
    pid_file = tmp_path / "pid"
    task = ct.Lepton(
        language="bash",
        command=f"sleep 30 & echo $! > {pid_file}; echo $$ >> {pid_file}; wait",
        executor=local_executor,
    )

    @ct.lattice
    def flow():
        return task()

    did = ct.dispatch(flow)()
    read_pid_lines = wait_until(
        lambda: pid_file.exists() and len(pid_file.read_text().split()) == 2
        and pid_file.read_text().split(), 30,
    )
    assert read_pid_lines, "the lepton never started"
    pids = [int(p) for p in read_pid_lines]
    ct.cancel(did)
    r = ct.get_result(did, wait=True, timeout=60)
    assert r.status == ct.Status.CANCELLED
    assert r.get_node_result(0)["cancel_outcome"] == "killed"
    assert wait_gone(pids) == [], "the lepton's shell or its sleep outlived the cancel"
