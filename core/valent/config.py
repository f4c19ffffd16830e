"""The user's config file (TOML) and the results directory.

The file is read and checked here, and written only by ``set_config``. Every executor setting
is checked by one function, :func:`settings_problems` (keys, types, finite numbers within the
bounds an executor declares), whichever path it comes by: dispatch, an executor made from the
config, ``validate_executor``, ``valent plugins``, ``set_config``.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import json
import math
import os
import sys
import tomllib
import types
import typing
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from .checks import bounds_text, is_number, number_problem
from .errors import ConfigError

CONFIG_ENV = "VALENT_CONFIG"
RESULTS_ENV = "VALENT_RESULTS_DIR"
TOP_LEVEL_KEYS = {"results_dir", "default_executor", "executors"}


# what ``config_path`` depends on: valent's variable, HOME (``~``) and those platformdirs reads
_PATH_ENV = (CONFIG_ENV, "HOME") + (
    ("APPDATA", "LOCALAPPDATA", "USERPROFILE") if sys.platform == "win32"
    else () if sys.platform == "darwin" else ("XDG_CONFIG_HOME",)
)
_paths: dict[tuple, tuple[Path, str]] = {}


def config_path() -> Path:
    """``$VALENT_CONFIG``, else ``config.toml`` in the user's config dir."""
    return _config_path()[0]


def _config_path() -> tuple[Path, str]:
    """``config_path()`` and its string, computed once per value of the variables that
    choose it (a changed variable is seen at once: it is part of the key)."""
    env = os.environ
    key = tuple(env.get(k) for k in _PATH_ENV)
    known = _paths.get(key)
    if known is not None:
        return known
    if key[0]:
        path = Path(key[0]).expanduser()
    else:
        import platformdirs

        path = Path(platformdirs.user_config_dir("valent")) / "config.toml"
    if len(_paths) > 64:
        _paths.clear()
    known = _paths[key] = (path, str(path))
    return known


@cache
def _load(path: str, stamp: tuple) -> dict[str, Any]:  # stamp keys the cache
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}; fix the syntax") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from exc
    problems = structure_problems(data, path)
    if problems:
        raise ConfigError(problems[0])
    return data


def structure_problems(data: dict[str, Any], where: Any) -> list[str]:
    """What is wrong with the shape of a config: top-level keys, their types, [executors]."""
    problems = []
    for key in sorted(set(data) - TOP_LEVEL_KEYS, key=str):
        problems.append(
            f"{where}: unknown top-level key(s) [{key!r}]{_did_you_mean(key, TOP_LEVEL_KEYS)}"
            f"{_covalent_note(key)}; valid keys: {sorted(TOP_LEVEL_KEYS)}"
        )
    for key in ("results_dir", "default_executor"):
        if key in data and not isinstance(data[key], str):
            problems.append(
                f"{where}: {key} = {data[key]!r} has the wrong type; expected a string"
            )
    execs = data.get("executors", {})
    if not isinstance(execs, dict) or not all(isinstance(v, dict) for v in execs.values()):
        problems.append(f"{where}: [executors] must hold tables like [executors.local]")
    return problems


def check_config(data: dict[str, Any] | None = None, plugins: Any = None) -> list[str]:
    """Every problem of the config (``data``, or the file): its shape, ``default_executor``,
    and each ``[executors.NAME]`` table checked against that executor's settings (the same
    check dispatch makes). ``valent plugins`` shows these; ``set_config`` refuses them."""
    from ._plugins.manager import get_plugins

    where = config_path()
    plugins = plugins or get_plugins()
    if data is None:
        try:
            data = load_config()
        except ConfigError as exc:
            return [str(exc)]
    problems = structure_problems(data, where)
    if problems:
        return problems
    installed = plugins.executors
    name = data.get("default_executor")
    if name is not None and name not in installed:
        problems.append(
            f"{where}: default_executor = {name!r} is not an installed executor"
            f"{_did_you_mean(name, installed)}; installed: {', '.join(sorted(installed))}"
        )
    for name, table in data.get("executors", {}).items():
        if name not in installed:
            why = plugins.unavailable.get(name)
            problems.append(
                f"{where}: [executors.{name}]: no installed executor is named {name!r}"
                + (f" ({why})" if why else _did_you_mean(name, installed))
                + f"; installed: {', '.join(sorted(installed))}"
            )
            continue
        problems += settings_problems(
            plugins.executor_class(name), table, f"{where}: [executors.{name}]"
        )
    return problems


def load_config() -> dict[str, Any]:
    """The parsed config file, or {} when there is none. Re-read when the file changes."""
    path, name = _config_path()
    try:
        st = os.stat(name)
    except FileNotFoundError:
        if os.environ.get(CONFIG_ENV):
            raise ConfigError(
                f"{CONFIG_ENV} names {path}, which does not exist; create it or unset the variable"
            ) from None
        return {}
    # a rewrite (set_config's os.replace) changes the inode even within one clock tick
    return _load(name, (st.st_mtime_ns, st.st_size, st.st_ino))


def results_dir() -> Path:
    """Where the results store lives: ``$VALENT_RESULTS_DIR``, the config, or the data dir."""
    env = os.environ.get(RESULTS_ENV)
    if env:
        return Path(env).expanduser()
    configured = load_config().get("results_dir")
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("valent")) / "results"


def default_executor_name() -> str:
    """The executor electrons use when neither they nor their lattice name one."""
    config = load_config()
    name = config.get("default_executor", "local")
    if "default_executor" in config:
        from ._plugins.manager import get_plugins

        installed = get_plugins().executors
        if name not in installed:
            raise ConfigError(
                f"{config_path()}: default_executor = {name!r} is not an installed executor"
                f"{_did_you_mean(name, installed)}; installed: {', '.join(sorted(installed))}"
            )
    return name


def executor_settings(name: str, cls: type) -> dict[str, Any]:
    """The ``[executors.NAME]`` table, checked against ``cls``'s settings (its __init__)."""
    table = load_config().get("executors", {}).get(name, {})
    if table:
        check_settings(cls, table, where=f"{config_path()}: [executors.{name}]")
    return dict(table)


def executor_from_config(name: str, cls: type) -> Any:
    """A new ``cls`` made with the ``[executors.NAME]`` settings.

    Raises ``ConfigError`` naming the file and table for a key ``cls`` does not take, a value
    of the wrong type or out of bounds, a required setting the table lacks, or any error its
    ``__init__`` raises, so a bad config never surfaces as a bare traceback from an executor.
    """
    settings = executor_settings(name, cls)
    where = f"{config_path()}: [executors.{name}]"
    missing = [
        k for k, p in cls.settings().items()
        if p.default is inspect.Parameter.empty and k not in settings
    ]
    if missing:
        raise ConfigError(
            f"{where}: executor {name!r} needs the setting(s) {', '.join(missing)}; add them "
            f"to that table, or pass an instance: {cls.__name__}({missing[0]}=...)"
        )
    try:
        return cls(**settings)
    except ConfigError as exc:
        if str(config_path()) in str(exc):
            raise
        raise ConfigError(f"{where}: {exc}") from exc
    except Exception as exc:
        raise ConfigError(
            f"{where}: {cls.__name__}({_call_args(settings)}) failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def validate_executor(spec: Any) -> Any:
    """The executor ``spec`` names, made and checked now; raise ``ConfigError`` if it is bad.

    ``spec`` is an executor name (its class is made with the config's ``[executors.NAME]``
    settings, so a bad setting or an error from ``__init__`` shows at once) or an ``Executor``
    instance (its number settings are checked: finite, within the bounds its class declares).
    Returns the executor. Meant for ``dispatch``: one call per executor a graph names.
    """
    from ._plugins.contract import Executor

    if isinstance(spec, str):
        from ._engine.resolve import make_executor
        from ._plugins.manager import get_plugins

        return make_executor(get_plugins(), spec)
    if isinstance(spec, Executor):
        cls = type(spec)
        problems = []
        for key, hint in _hints(cls).items():
            value = getattr(spec, key, None)
            if is_number(value):
                problems += _value_problems(key, value, hint, numbers_only=True)
        if problems:
            raise ConfigError(
                f"{cls.__name__} instance: " + "; ".join(problems)
                + f"; make it again with valid settings ({cls.__module__}.{cls.__name__})"
            )
        return spec
    raise ConfigError(
        f"an executor must be a name (like 'local') or an Executor instance, got {spec!r}"
    )


def check_settings(cls: type, values: dict[str, Any], where: str) -> None:
    """Raise ``ConfigError`` for a key ``cls`` does not take or a bad value (see
    :func:`settings_problems`); the one check every path (dispatch, executors made from the
    config, ``valent plugins``, ``set_config``) uses."""
    problems = settings_problems(cls, values, where)
    if problems:
        raise ConfigError("\n".join(problems))


def settings_problems(cls: type, values: dict[str, Any], where: str) -> list[str]:
    """What is wrong with ``values`` as settings of ``cls``: unknown keys (with a "did you
    mean"), wrong types (by its ``__init__`` annotations; a bool is not a number), numbers that
    are not finite or outside the bounds the annotation declares (``Annotated[float, Ge(0)]``).
    """
    params = cls.settings()  # type: ignore[attr-defined]
    hints = _hints(cls)
    problems = []
    for key, value in values.items():
        if key not in params:
            problems.append(
                f"{where}: unknown key {key!r}{_did_you_mean(key, params)}; "
                f"{cls.__name__} accepts: {', '.join(sorted(params)) or 'no settings'}"
            )
            continue
        hint = hints.get(key, params[key].annotation)
        problems += [f"{where}: {p}" for p in _value_problems(key, value, hint)]
    return problems


def _hints(cls: type) -> dict[str, Any]:
    params = cls.settings()  # type: ignore[attr-defined]
    try:
        hints = typing.get_type_hints(cls.__init__, include_extras=True)
    except Exception:
        hints = {}
    return {k: hints.get(k, p.annotation) for k, p in params.items()}


def _value_problems(key: str, value: Any, hint: Any, numbers_only: bool = False) -> list[str]:
    """``[]`` if ``value`` fits ``hint``, else one message: the wrong type, or the bound."""
    if hint is inspect.Parameter.empty:
        hint = Any
    fits = [h for h in _alternatives(hint) if _matches(value, _base(h))]
    if not fits:
        if numbers_only:
            return []
        literals = [a for h in _alternatives(hint) if typing.get_origin(_base(h)) is typing.Literal
                    for a in typing.get_args(_base(h))]
        hint_text = _did_you_mean(value, literals) if isinstance(value, str) else ""
        what = "is not allowed" if literals else "has the wrong type"
        return [f"{key} = {value!r} {what}{hint_text}; expected {_describe(hint)}"]
    if not is_number(value):
        return []
    first = None
    for h in fits:
        bounds = _bounds(h)
        integer = _base(h) is int
        problem = number_problem(value, integer=integer, **bounds)
        if problem is None:
            return []
        want = bounds_text(integer=integer, **bounds)
        first = first or f"{key} = {value!r}: {problem}; give {want}"
    return [first] if first else []


def _alternatives(hint: Any) -> list[Any]:
    """The members of a union (``Annotated`` ones kept whole), else ``[hint]``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return [a for m in typing.get_args(hint) for a in _alternatives(m)]
    if origin is typing.Annotated:
        inner = _alternatives(typing.get_args(hint)[0])
        if len(inner) > 1:  # Annotated[int | None, Ge(1)]: the bounds apply to each member
            meta = hint.__metadata__
            return [typing.Annotated[(m, *meta)] if m is not type(None) else m for m in inner]
    return [hint]


def _base(hint: Any) -> Any:
    return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint


def _bounds(hint: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in getattr(hint, "__metadata__", ()):
        for op in ("ge", "gt", "le", "lt"):
            v = getattr(m, op, None)
            if is_number(v):
                out[op] = v
    return out


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any or isinstance(hint, str):
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) or origin is typing.Annotated:
        return any(_matches(value, _base(a)) for a in _alternatives(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    target = origin or hint
    if not isinstance(target, type):
        return True
    if target is float:
        return is_number(value)
    if target is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if target in (Path, os.PathLike):
        return isinstance(value, str)
    return isinstance(value, target)


def _describe(hint: Any) -> str:
    alts = _alternatives(hint)
    if len(alts) > 1:
        return " or ".join(_describe(a) for a in alts)
    hint = _base(alts[0])
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "nothing (leave the key out)"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _did_you_mean(key: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(key), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _call_args(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in settings.items())


# ----------------------------------------------------------------- the config API (ct.*_config)

COVALENT_ONLY_SECTIONS = {"sdk", "dispatcher", "user_interface", "credentials"}
"""Covalent config sections that mean nothing in valent (it has no server to configure)."""
COVALENT_ONLY_KEYS = {"enable_logging", "log_level", "log_dir", "logs", "executor_dir"}
"""Covalent's bare logging keys (``set_config("enable_logging", ...)``): nothing here."""
COVALENT_ALIASES = {"dispatcher.results_dir": "results_dir"}
"""Covalent keys with a valent equivalent: read and written as that key."""

_UNSET: Any = object()


def _covalent_note(key: str) -> str:
    head = str(key).split(".", 1)[0]
    if head in COVALENT_ONLY_SECTIONS or key in COVALENT_ONLY_KEYS:
        return (
            f" ({key!r} is a Covalent setting: valent has no server, so it means nothing here;"
            " leave it out)"
        )
    return ""


def _covalent_only(key: str) -> bool:
    if key in COVALENT_ALIASES:
        return False
    return key.split(".", 1)[0] in COVALENT_ONLY_SECTIONS or key in COVALENT_ONLY_KEYS


def _warn_covalent(key: str, what: str) -> None:
    import warnings

    warnings.warn(
        f"{key!r} is a Covalent setting that means nothing in valent: there is no server "
        f"(the dispatcher runs inside the process that dispatches, and task output goes to the "
        f"results store: `valent logs`); {what}. See valent's docs/config.md.",
        CovalentSettingWarning,
        stacklevel=3,
    )


class CovalentSettingWarning(UserWarning):
    """A Covalent config key with no meaning in valent was read (None) or set (ignored)."""


def get_config(key: str | list[str] | None = None) -> Any:
    """The configuration in effect: the whole dict, one dotted key, or a dict of several.

    ``get_config()`` gives ``results_dir``, ``default_executor`` and, per installed executor,
    every setting with the value it will get (the config file's, else the default).
    ``get_config("executors.local.grace")`` gives one value; an unknown key is a
    ``ConfigError`` with a "did you mean". Covalent's server keys (``dispatcher.address``,
    ``sdk.*``, ...) give ``None`` with a :class:`CovalentSettingWarning`.
    """
    if isinstance(key, list | tuple):
        return {k: get_config(k) for k in key}
    if key is None:
        return _effective()
    if not isinstance(key, str) or not key:
        raise ConfigError(
            f"get_config() takes a dotted key like 'executors.local.grace', got {key!r}"
        )
    key = COVALENT_ALIASES.get(key, key)
    if _covalent_only(key):
        _warn_covalent(key, "get_config returns None for it")
        return None
    effective = _effective()
    node: Any = effective
    for i, part in enumerate(key.split(".")):
        if not isinstance(node, dict) or part not in node:
            done = ".".join(key.split(".")[:i])
            keys = sorted(node) if isinstance(node, dict) else []
            raise ConfigError(
                f"no config key {key!r}" + _did_you_mean(part, keys)
                + (f"; keys under {done!r}: {', '.join(map(str, keys))}" if done else
                   f"; top-level keys: {', '.join(map(str, keys))}")
            )
        node = node[part]
    return copy.deepcopy(node)


def _effective() -> dict[str, Any]:
    from ._plugins.manager import get_plugins

    data = load_config()
    tables = data.get("executors", {})
    executors: dict[str, Any] = {}
    for name, info in sorted(get_plugins().executors.items()):
        table = tables.get(name, {})
        executors[name] = {
            k: table[k] if k in table else p.default
            for k, p in info.cls.settings().items()
            if k in table or p.default is not inspect.Parameter.empty
        }
    for name, table in tables.items():  # a table for an executor not installed: as written
        executors.setdefault(name, copy.deepcopy(table))
    return {
        "results_dir": str(results_dir()),
        "default_executor": data.get("default_executor", "local"),
        "executors": executors,
    }


def set_config(new: dict[str, Any] | str, value: Any = _UNSET) -> None:
    """Change settings in the config file valent reads (``config_path()``), checked first.

    ``set_config("executors.local.grace", 2.0)`` or ``set_config({"default_executor":
    "dask", "executors.dask.n_workers": 4})`` (nested dicts work too). ``None`` removes a key
    (back to its default). Every change is checked like the file is (unknown keys, types,
    bounds) and nothing is written if one is bad; then the file is replaced atomically (the
    file is rewritten: comments in it are not kept). Covalent's server keys are ignored with a
    :class:`CovalentSettingWarning`. Executors already made in this process keep the
    settings they were made with.
    """
    if isinstance(new, str):
        if value is _UNSET:
            raise ConfigError(
                f"set_config({new!r}) needs a value: set_config({new!r}, value), or None to "
                "remove the key"
            )
        changes = _flatten({new: value})
    elif isinstance(new, dict):
        if value is not _UNSET:
            raise ConfigError("set_config(dict) takes no second argument")
        changes = _flatten(new)
    else:
        raise ConfigError(
            f"set_config() takes a dotted key and a value, or a dict of them; got {new!r}"
        )
    path = config_path()
    with _write_lock(path):
        data = copy.deepcopy(load_config()) if path.exists() else {}  # else: create it
        for key, val in changes.items():
            key = COVALENT_ALIASES.get(key, key)
            if _covalent_only(key):
                _warn_covalent(key, "set_config ignores it (the file is not changed for it)")
                continue
            _put(data, key, val)
        problems = check_config(data)
        if problems:
            raise ConfigError("\n".join(problems) + "\n(nothing was written)")
        _write_atomic(path, to_toml(data))
    _load.cache_clear()


def reload_config() -> None:
    """Read the config file again now (valent also re-reads it whenever it changes)."""
    _load.cache_clear()
    load_config()


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if not isinstance(k, str) or not k:
            raise ConfigError(f"config keys are non-empty strings, got {k!r}")
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _put(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    top = parts[0]
    if top not in TOP_LEVEL_KEYS:
        raise ConfigError(
            f"no config key {key!r}{_did_you_mean(top, TOP_LEVEL_KEYS)}; keys: results_dir, "
            "default_executor, executors.NAME.SETTING (nothing was written)"
        )
    depth = 3 if top == "executors" else 1
    if len(parts) != depth and not (top == "executors" and len(parts) == 2 and value is None):
        shape = "executors.NAME.SETTING" if top == "executors" else top
        raise ConfigError(f"config key {key!r} must look like {shape!r} (nothing was written)")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {key!r}: {part!r} is not a table (nothing was written)")
    if value is None:
        node.pop(parts[-1], None)
        if top == "executors" and len(parts) == 3 and not node:
            data["executors"].pop(parts[1], None)
        if top == "executors" and not data.get("executors"):
            data.pop("executors", None)
    else:
        node[parts[-1]] = value


def to_toml(data: dict[str, Any]) -> str:
    """``data`` (tables of strings, numbers, booleans, lists) as TOML text."""
    lines: list[str] = []
    _toml_table(data, [], lines)
    text = "\n".join(lines).lstrip("\n") + "\n"
    if tomllib.loads(text) != data:  # never write a file that would read back differently
        raise ConfigError(f"cannot write {data!r} as TOML faithfully")
    return text


def _toml_table(table: dict[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    subtables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if path and (scalars or not subtables):
        lines += ["", "[" + ".".join(_toml_key(p) for p in path) + "]"]
    for k, v in scalars.items():
        lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, v in subtables.items():
        _toml_table(v, [*path, k], lines)


def _toml_key(key: str) -> str:
    if key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key):
        return key
    return _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(
        f"{value!r} ({type(value).__name__}) cannot be stored in the config file; use a "
        "string, number, boolean or list"
    )


@contextlib.contextmanager
def _write_lock(path: Path) -> Iterator[None]:
    """One writer of the config file at a time, across processes (read-modify-write)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600  # it may hold host names, key paths, tokens
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{path}: cannot be written: {exc}") from exc
