"""The results store holds no secret: an SSH error names ``ssh_key_file``, never its path
(docs/security.md; DESIGN.md "Store trust")."""

from __future__ import annotations

import sqlite3
import uuid

import pytest
import valent as ct
from valent._store import get_store

pytest_plugins = ["ssh_fixtures"]


def _pieces(path) -> list[str]:
    """The path and each of its distinctive parts (its folders and file name)."""
    parts = [p for p in str(path).split("/") if len(p) > 6]
    return [str(path), *parts]


def _assert_store_holds_none_of(results_dir, path) -> None:
    get_store().close()
    for f in results_dir.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for piece in _pieces(path):
                assert piece.encode() not in data, f"{f} holds {piece!r}"
    conn = sqlite3.connect(results_dir / "valent.db")
    try:
        for table in ("dispatches", "nodes"):
            for row in conn.execute(f"SELECT * FROM {table}"):
                text = " ".join(str(v) for v in row)
                for piece in _pieces(path):
                    assert piece not in text, f"{table} holds {piece!r}: {text[:300]}"
    finally:
        conn.close()


def _run(ssh, key_file):
    remote = ssh(ssh_key_file=str(key_file))

    @ct.electron(executor=remote)
    def on_host(x):
        return x + 1

    @ct.lattice
    def flow(x):
        return on_host(x)

    result = ct.dispatch_sync(flow)(1)
    assert result.status == ct.Status.FAILED
    node = [n for n in result.get_all_node_results() if n["node_name"] == "on_host"][0]
    assert node["status"] == ct.Status.FAILED
    assert "ssh_key_file" in node["error"], node["error"]
    return node


def test_a_missing_key_files_path_never_reaches_the_store(ssh, results_dir, tmp_path):
    key = tmp_path / f"private-folder-{uuid.uuid4().hex[:10]}" / f"id_secret_{uuid.uuid4().hex}"
    node = _run(ssh, key)
    assert "does not exist" in node["error"]
    _assert_store_holds_none_of(results_dir, key)


@pytest.mark.parametrize("content", [b"not a key at all\n", b""])
def test_an_unusable_key_files_path_never_reaches_the_store(ssh, results_dir, tmp_path,
                                                             content):
    """paramiko's own errors about the key file may quote its path: they are redacted."""
    folder = tmp_path / f"private-folder-{uuid.uuid4().hex[:10]}"
    folder.mkdir()
    key = folder / f"id_secret_{uuid.uuid4().hex}"
    key.write_bytes(content)
    key.chmod(0o600)
    _run(ssh, key)
    _assert_store_holds_none_of(results_dir, key)
