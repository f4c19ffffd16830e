"""The user's config file (TOML) and the results directory: read, checked, never written."""

from __future__ import annotations

import inspect
import os
import tomllib
import typing
from functools import cache
from pathlib import Path
from typing import Any

from .errors import ConfigError, ValentError

CONFIG_ENV = "VALENT_CONFIG"
RESULTS_ENV = "VALENT_RESULTS_DIR"
TOP_LEVEL_KEYS = {"results_dir", "default_executor", "executors"}


def config_path() -> Path:
    """``$VALENT_CONFIG``, else ``config.toml`` in the user's config dir."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("valent")) / "config.toml"


@cache
def _load(path: str, mtime: float) -> dict[str, Any]:  # noqa: ARG001 - mtime keys the cache
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}; fix the syntax") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from exc
    unknown = set(data) - TOP_LEVEL_KEYS
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level key(s) {sorted(unknown)}; "
            f"valid keys: {sorted(TOP_LEVEL_KEYS)}"
        )
    for key in ("results_dir", "default_executor"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(
                f"{path}: {key} = {data[key]!r} has the wrong type; expected a string"
            )
    execs = data.get("executors", {})
    if not isinstance(execs, dict) or not all(isinstance(v, dict) for v in execs.values()):
        raise ConfigError(f"{path}: [executors] must hold tables like [executors.local]")
    return data


def load_config() -> dict[str, Any]:
    """The parsed config file, or {} when there is none. Re-read when the file changes."""
    path = config_path()
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        if os.environ.get(CONFIG_ENV):
            raise ConfigError(
                f"{CONFIG_ENV} names {path}, which does not exist; create it or unset the variable"
            ) from None
        return {}
    return _load(str(path), mtime)


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
        from .plugins import get_plugins

        installed = get_plugins().executors
        if name not in installed:
            raise ConfigError(
                f"{config_path()}: default_executor = {name!r} is not an installed executor; "
                f"installed: {', '.join(sorted(installed))}"
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
    of the wrong type, or a value its ``__init__`` rejects (``ValueError``/``TypeError``/
    ``ValentError``), so a bad config never surfaces as a bare traceback from an executor.
    """
    settings = executor_settings(name, cls)
    try:
        return cls(**settings)
    except (TypeError, ValueError, ValentError) as exc:
        if not settings or isinstance(exc, ConfigError) and str(config_path()) in str(exc):
            raise
        raise ConfigError(
            f"{config_path()}: [executors.{name}]: {cls.__name__} rejected these settings: "
            f"{exc}"
        ) from exc


def check_settings(cls: type, values: dict[str, Any], where: str) -> None:
    """Raise ``ConfigError`` for a key ``cls`` does not take or a value of the wrong type."""
    params = cls.settings()  # type: ignore[attr-defined]
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:
        hints = {}
    for key, value in values.items():
        if key not in params:
            raise ConfigError(
                f"{where}: unknown key {key!r}; {cls.__name__} accepts: "
                f"{', '.join(sorted(params)) or 'no settings'}"
            )
        hint = hints.get(key, params[key].annotation)
        if hint is inspect.Parameter.empty or _matches(value, hint):
            continue
        raise ConfigError(
            f"{where}: {key} = {value!r} has the wrong type; expected {_describe(hint)}"
        )


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any or isinstance(hint, str):
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    target = origin or hint
    if not isinstance(target, type):
        return True
    if target is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if target is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if target in (Path, os.PathLike):
        return isinstance(value, str)
    return isinstance(value, target)


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
