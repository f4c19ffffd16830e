"""valent ships as a real package: ``python -m build`` makes an sdist and a wheel (the wheel
built from the sdist), and the wheel installs into a fresh venv where, with no checkout on
the path, ``valent plugins`` finds the three built-in executors and ``valent demo`` runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_sdist_and_wheel_install_and_run_in_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (sdist,) = dist.glob("valent-*.tar.gz")
    (wheel,) = dist.glob("valent-*.whl")
    assert sdist.stat().st_size > 0

    venv = tmp_path / "venv"
    # the dependencies (dask, paramiko, ...) come from this interpreter's site-packages;
    # valent itself only from the wheel
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=300)
    py = venv / "bin" / "python"
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                          str(wheel)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VALENT_CONFIG")}
    env.update(VALENT_RESULTS_DIR=str(tmp_path / "results"),
               XDG_CONFIG_HOME=str(tmp_path / "xdg"))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=300,
                              cwd=elsewhere, env=env)

    where = run(str(py), "-c", "import valent, valent_local; print(valent.__file__); "
                "print(valent_local.__file__)")
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert Path(line).resolve().is_relative_to(venv.resolve()), where.stdout
    valent = str(venv / "bin" / "valent")
    plugins = run(valent, "plugins", "--json")
    assert plugins.returncode == 0, plugins.stderr
    names = {e["name"] for e in json.loads(plugins.stdout)["executors"]}
    assert {"local", "dask", "ssh"} <= names
    static = run(str(py), "-c", "import importlib.resources as r; "
                 "print(sorted(p.name for p in r.files('valent.ui').joinpath('static')"
                 ".iterdir()))")
    assert static.returncode == 0 and "[]" not in static.stdout, static.stderr
    demo = run(valent, "demo", "--scale", "0.05")
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "CANCELLED" in demo.stdout, demo.stdout
