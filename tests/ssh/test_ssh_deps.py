"""Electron steps (deps_bash, call_before/after) and traced operators on the SSH executor."""

from __future__ import annotations

import uuid

import valent as ct

pytest_plugins = ["ssh_fixtures"]


def _read_and_remove(path):
    import os

    with open(path) as f:
        text = f.read()
    os.unlink(path)
    return text


def test_steps_and_operators_run_on_ssh(ssh, rig):
    remote = ct.executors.SSHExecutor(**rig.settings())
    ssh()  # the fixture closes the connections and checks the host afterwards
    path = f"/tmp/valent-ssh-deps-{uuid.uuid4().hex}"

    @ct.electron(
        executor=remote,
        deps_bash=[f"echo from-bash > {path}"],
        call_before=ct.DepsCall(_read_and_remove, args=(path,), retval_keyword="seen"),
        call_after=ct.DepsCall(print, args=("after",)),
    )
    def task(x, seen=None):
        import os

        return seen.strip(), x, os.getpid()

    @ct.electron(executor=remote)
    def pair(x):
        return x, x + 1

    @ct.lattice(executor=remote)
    def flow(x):
        seen, value, _ = task(x)
        a, b = pair(value)
        return [seen, a * b - 1]

    result = ct.dispatch_sync(flow)(3)
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == ["from-bash", 11]
    node = result.get_node_result(0)
    assert node["executor"] == "ssh" and "after" in node["stdout"]


def test_bash_and_python_leptons_run_on_ssh(ssh, rig):
    remote = ct.executors.SSHExecutor(**rig.settings())
    ssh()
    multiply = ct.Lepton(
        language="bash",
        command="product=$(({num_1} * {num_2}))",
        argtypes=[
            (int, ct.Lepton.INPUT_OUTPUT),
            (int, ct.Lepton.INPUT_OUTPUT),
            (int, ct.Lepton.OUTPUT),
        ],
        named_outputs=["num_1", "num_2", "product"],
        executor=remote,
    )
    join = ct.Lepton(library_name="os.path", function_name="join", executor=remote)

    @ct.lattice
    def flow(**kwargs):
        return [multiply(**kwargs), join("/a", "b")]

    result = ct.dispatch_sync(flow)(num_1=7, num_2=8)
    assert result.status == ct.Status.COMPLETED, result.error
    assert result.result == [(7, 8, 56), "/a/b"]
