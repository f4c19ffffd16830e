"""Security defaults: a private results dir and output files, no executor settings (keys,
hosts, passwords) in the store, and docs that say what unpickling results trusts."""

from __future__ import annotations

import stat
from pathlib import Path

import valent as ct


def _big(n):
    return b"s" * n


def test_results_dir_is_private_and_big_outputs_too(results_dir, local_executor):
    big = ct.electron(_big, executor=local_executor)

    @ct.lattice
    def wf(n):
        return big(n)

    assert ct.dispatch_sync(wf)(2 * 2**20).status == ct.Status.COMPLETED
    assert stat.S_IMODE(results_dir.stat().st_mode) == 0o700
    files = list((results_dir / "outputs").rglob("*"))
    assert files
    for f in files:
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode & 0o077 == 0, f"{f} is readable by others: {oct(mode)}"


def test_executor_settings_never_reach_the_store(results_dir):
    secret = "s3cr3t-key-path-for-the-test"
    ex = ct.executors.LocalExecutor(workers=1)
    ex.ssh_key_file = secret  # a setting a real executor would hold (like SSH's key path)
    e = ct.electron(_big, executor=ex)

    @ct.lattice
    def wf(n):
        return e(n)

    try:
        assert ct.dispatch_sync(wf)(3).status == ct.Status.COMPLETED
    finally:
        ex.shutdown()
    for f in results_dir.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f"{f} holds an executor setting"


def test_docs_say_results_are_pickles_and_whom_that_trusts():
    text = (Path(__file__).parent.parent / "docs" / "security.md").read_text()
    assert "pickle" in text.lower() and "trust" in text.lower()
    assert "0700" in text
