"""When the dispatching process dies (kill -9 or SIGTERM), every worker and every process a
task started dies too: noticed by the kernel, not by a thread in the worker (a task may hold
the GIL) nor by a pipe a fork of the owner keeps open."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from core_support import wait_gone, wait_until
from valent.testing.procs import alive

OWNER = textwrap.dedent(
    """
    import multiprocessing, os, re, subprocess, sys, time
    import valent as ct

    out = sys.argv[1]

    def put(name, text):
        with open(f"{out}/{name}.tmp", "w") as f:
            f.write(text)
        os.replace(f"{out}/{name}.tmp", f"{out}/{name}")

    def daemon_task():
        got = subprocess.run(
            ["sh", "-c", "setsid sleep 300 > /dev/null 2>&1 < /dev/null & echo $!"],
            capture_output=True, text=True, check=True)
        put("daemon", f"{os.getpid()} {got.stdout.strip()}")
        time.sleep(300)

    def regex_task():
        put("regex", str(os.getpid()))
        re.match(r"(a*)*b", "a" * 40)  # C code that never releases the GIL, for ages

    def helper():
        time.sleep(300)

    if __name__ == "__main__":
        ex = ct.executors.LocalExecutor(workers=2)
        d, r = ct.electron(daemon_task, executor=ex), ct.electron(regex_task, executor=ex)

        @ct.lattice
        def wf():
            return [d(), r()]

        fork = multiprocessing.get_context("fork").Process(target=helper)
        fork.start()  # inherits every pipe and socket the owner has at this point
        dispatch_id = ct.dispatch(wf)()
        put("owner", f"{os.getpid()} {fork.pid}")
        time.sleep(300)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_every_task_process_dies_with_its_owner(tmp_path, sig):
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    out = tmp_path / "out"
    out.mkdir()
    owner = subprocess.Popen([sys.executable, str(script), str(out)], cwd=tmp_path)
    pids: list[int] = []
    helper = None
    try:
        files = ("owner", "daemon", "regex")
        assert wait_until(lambda: all((out / f).exists() for f in files), 60), (
            "the owner's tasks never started: " + str(sorted(os.listdir(out)))
        )
        owner_pid, helper = map(int, (out / "owner").read_text().split())
        daemon_worker, daemon = map(int, (out / "daemon").read_text().split())
        regex_worker = int((out / "regex").read_text())
        pids = [daemon_worker, daemon, regex_worker]
        assert owner_pid == owner.pid and all(alive(p) for p in pids + [helper])
        owner.send_signal(sig)
        owner.wait(30)
        left = wait_gone(pids, 20)
        assert left == [], f"outlived their owner: {left} (of {pids})"
        assert alive(helper)  # the owner's fork, holding its pipes, was still there
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        for p in pids + ([helper] if helper else []):
            if alive(p):
                os.kill(p, signal.SIGKILL)
        wait_gone(pids + ([helper] if helper else []), 10)


POOL_OWNER = textwrap.dedent(
    """
    import sys, time
    from valent.plugin import ProcessPool

    pool = ProcessPool(2, grace=0.5, name="owner-test")
    pool.start()
    while len(pool.own_pids()) < 3:  # two workers and the watcher
        time.sleep(0.01)
    print(pool._loop.tmpdir, flush=True)
    print(" ".join(map(str, pool.own_pids())), pool.worker_pids(), flush=True)
    time.sleep(300)
    """
)


def test_workers_die_with_their_owner_even_after_its_children_got_sigterm(tmp_path):
    """`pkill -P OWNER` (SIGTERM to each of its children, the watcher too), then the owner is
    killed: the watcher must have ignored the SIGTERM and still take the workers down (it
    once died first, leaving the workers frozen for ever)."""
    script = tmp_path / "pool_owner.py"
    script.write_text(POOL_OWNER)
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        pool_dir = owner.stdout.readline().strip()
        assert os.path.isdir(pool_dir), pool_dir
        line = owner.stdout.readline()
        own, workers = line.rsplit(" [", 1)
        pids = [int(x) for x in own.split()]
        workers = [int(x) for x in workers.strip("]\n").split(",")]
        watcher = [p for p in pids if p not in workers]
        assert len(watcher) == 1 and len(workers) == 2, line
        assert wait_until(lambda: _ignores(watcher[0], signal.SIGTERM), 20), "watcher not up"
        os.kill(watcher[0], signal.SIGTERM)
        time.sleep(0.3)
        assert alive(watcher[0]), "the watcher died of SIGTERM"
        owner.kill()
        owner.wait(30)
        assert wait_gone(pids, 20) == [], "workers or watcher outlived their owner"
        assert not os.path.exists(pool_dir), "the dead owner's pool folder was left behind"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        owner.stdout.close()
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


def _ignores(pid: int, sig: int) -> bool:
    """True once ``pid`` ignores ``sig`` (its SigIgn mask in /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


QUICK_OWNER = textwrap.dedent(
    """
    import os, subprocess, sys
    watcher = subprocess.Popen([sys.executable, "-P", sys.argv[1], str(os.getpid())],
                               stdin=subprocess.PIPE, start_new_session=True)
    watcher.stdin.write(f"+ {sys.argv[2]}\\n".encode())
    watcher.stdin.flush()
    print(watcher.pid, flush=True)
    os._exit(0)  # dead before the watcher's interpreter is up
    """
)


def test_a_watcher_that_starts_after_its_owner_died_still_kills_the_workers(tmp_path):
    """Under load the watcher may start after its owner was already killed: it must still
    read the workers the pool told it of and kill them (it once saw the owner gone at start,
    read nothing and killed nothing, leaving the frozen workers for ever). The owner here is
    a stand-in that dies at once, the only way to make that race happen every time; the
    watcher is valent's real one, the victim a real process."""
    import valent._pool.watch as watch

    script = tmp_path / "quick_owner.py"
    script.write_text(QUICK_OWNER)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                              start_new_session=True)
    watcher_pid = None
    try:
        out = subprocess.run([sys.executable, str(script), watch.__file__, str(victim.pid)],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        watcher_pid = int(out.split()[0])
        assert wait_until(lambda: victim.poll() is not None, 20), (
            "the watcher did not kill the worker of an owner that died before it started")
        assert victim.returncode == -signal.SIGKILL
        assert wait_gone([watcher_pid], 20) == []
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait()
        if watcher_pid and alive(watcher_pid):
            os.kill(watcher_pid, signal.SIGKILL)


POOL_STARTER = textwrap.dedent(
    """
    import subprocess, sys, time
    from valent.plugin import ProcessPool

    if sys.argv[1] == "slow-watcher":  # the fake: the watcher's start takes a while
        real = subprocess.Popen

        class SlowPopen(real):
            def __init__(self, args, *a, **k):
                if any(str(x).endswith("watch.py") for x in args):
                    print("watcher starting", flush=True)
                    time.sleep(0.5)
                super().__init__(args, *a, **k)

        subprocess.Popen = SlowPopen
    ProcessPool(2, grace=0.5, name="early-owner").start()
    print("started", flush=True)
    time.sleep(300)
    """
)


@pytest.mark.parametrize("when", ["while its watcher starts", "once its folder exists"])
def test_an_owner_killed_while_its_pool_starts_leaves_no_folder_and_no_process(
    tmp_path, when
):
    """The owner is killed while its pool starts: during its watcher's start (held open by a
    fake: the owner's Popen of the watcher waits 0.5 s first; no other way to hit that moment
    every time), or as soon as the pool's folder exists. The pool's folder once was made
    before its watcher existed, and a kill in between left it behind. Now it is made only
    once the watcher is up, and named to it at once: it is always removed, and no worker or
    watcher is left. Real owners, watchers, workers and kills."""
    import psutil

    script = tmp_path / "starter.py"
    script.write_text(POOL_STARTER)
    folders = tmp_path / "tmp"
    folders.mkdir()
    env = dict(os.environ, TMPDIR=str(folders))

    def left() -> list:
        return [p for p in folders.iterdir() if p.name.startswith("early-owner-pool-")]

    def started_here() -> list[int]:  # the owner's workers and watcher (they inherit TMPDIR)
        return [p.pid for p in psutil.process_iter(["environ"])
                if (p.info["environ"] or {}).get("TMPDIR") == str(folders)]

    mode = "slow-watcher" if when == "while its watcher starts" else "plain"
    owner = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE,
                             env=env, text=True)
    try:
        if mode == "slow-watcher":
            assert owner.stdout.readline() == "watcher starting\n"
        else:
            assert wait_until(lambda: left(), 60, 0.0005), "the pool made no folder"
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()
    assert wait_until(lambda: not left(), 20), (
        f"the pool folder of a killed owner was left behind: {left()}")
    assert wait_until(lambda: not started_here(), 20), "a worker or watcher outlived its owner"
