"""A task's traceback names the user's file and line, not ``<dynamic-code>``.

Functions defined in a script's ``__main__`` or inside another function are pickled by value;
cloudpickle (3.1+) renames their code's file to ``<dynamic-code>``. valent's pickler keeps it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import cloudpickle
import valent as ct
from valent.pickling import dumps


def _nested():
    def boom(x):
        y = [i * 2 for i in range(x)]  # a nested code object (the comprehension) too
        raise ValueError(f"bad {y}")

    return boom


def test_a_function_pickled_by_value_keeps_its_file_and_lines():
    fn = _nested()
    assert _DYNAMIC_IN(cloudpickle.dumps(fn))  # the problem this module works around
    loaded = cloudpickle.loads(dumps(fn))
    assert loaded.__code__.co_filename == __file__
    assert loaded.__code__.co_firstlineno == fn.__code__.co_firstlineno
    assert dumps(fn) == dumps(_nested())  # still deterministic
    try:
        loaded(2)
    except ValueError as exc:
        assert exc.__traceback__.tb_next.tb_frame.f_code.co_filename == __file__


def _DYNAMIC_IN(blob: bytes) -> bool:  # noqa: N802 - reads as a predicate
    return b"<dynamic-code>" in blob


def test_node_traceback_names_the_users_file_and_line(local_executor):
    boom = ct.electron(_nested(), executor=local_executor)

    @ct.lattice
    def wf(x):
        return boom(x)

    r = ct.dispatch_sync(wf)(2)
    assert r.status == ct.Status.FAILED
    tb = r.get_node_result(0)["traceback"]
    line = _nested.__code__.co_firstlineno + 3
    assert f'File "{__file__}", line {line}, in boom' in tb, tb
    assert 'raise ValueError(f"bad {y}")' in tb  # the source line, read from the file
    assert "<dynamic-code>" not in tb


def test_a_script_run_as_main_shows_its_own_file(tmp_path):
    script = tmp_path / "flow.py"
    script.write_text(textwrap.dedent("""
        import valent as ct

        @ct.electron
        def boom(x):
            raise RuntimeError(f"bad {x}")

        @ct.lattice
        def wf(x):
            return boom(x)

        r = ct.dispatch_sync(wf)(1)
        print(r.get_node_result(0)["traceback"])
    """))
    env = {**os.environ, "VALENT_RESULTS_DIR": str(tmp_path / "r")}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f'File "{script}", line 6, in boom' in out.stdout, out.stdout
    assert 'raise RuntimeError(f"bad {x}")' in out.stdout
