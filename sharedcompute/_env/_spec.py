"""What a user writes as ``runtime_env``, checked and merged; and what a task carries.

A user's ``runtime_env`` is a dict: ``working_dir`` (a directory), ``py_modules``
(packages, module files or imported module objects), ``env_vars`` (str to str)
and ``excludes`` (gitignore-style patterns for both). :func:`check` validates it
at once, naming the key or value that is wrong; :func:`merge` lays a task's dict
over its driver's (keys replace, ``env_vars`` merge), as Ray does.

What travels with a task is an :class:`Env`: the content ids of the packages
(``pkg-<sha256>``, see ``_pack``) and the variables, frozen and hashable, so the
scheduler can match it against a worker's and a node can set it up from ids
alone. The same directory gives the same ``Env`` on every driver.
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KEYS = ("working_dir", "py_modules", "env_vars", "excludes")


@dataclass(frozen=True, slots=True)
class Env:
    """A runtime_env as a task carries it: package ids and variables, no paths."""

    working_dir: str | None = None
    py_modules: tuple[str, ...] = ()
    env_vars: tuple[tuple[str, str], ...] = ()

    @property
    def packages(self) -> tuple[str, ...]:
        return ((self.working_dir,) if self.working_dir else ()) + self.py_modules

    def to_json(self) -> list[Any]:
        return [self.working_dir, list(self.py_modules), [list(kv) for kv in self.env_vars]]

    @classmethod
    def from_json(cls, value: list[Any]) -> Env:
        return cls(value[0], tuple(value[1]), tuple((k, v) for k, v in value[2]))

    def describe(self) -> str:
        parts = []
        if self.working_dir:
            parts.append(f"working_dir {self.working_dir}")
        if self.py_modules:
            parts.append(f"py_modules {list(self.py_modules)}")
        if self.env_vars:
            parts.append(f"env_vars {sorted(k for k, _ in self.env_vars)}")
        return ", ".join(parts) or "empty"


def check(spec: Any, where: str = "runtime_env") -> dict[str, Any]:
    """A copy of ``spec`` with its values checked (paths made absolute); raises on the first
    thing that is wrong, naming it."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(spec).__name__}")
    unknown = sorted(str(k) for k in spec if k not in KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; known: {list(KEYS)}")
    checked: dict[str, Any] = {}
    if spec.get("working_dir") is not None:
        checked["working_dir"] = _directory(spec["working_dir"], f"{where}['working_dir']")
    if spec.get("py_modules") is not None:
        modules = spec["py_modules"]
        if isinstance(modules, (str, os.PathLike, types.ModuleType)):
            raise TypeError(f"{where}['py_modules'] must be a list, got one "
                            f"{type(modules).__name__}; write [{modules!r}]")
        checked["py_modules"] = [
            _module_path(m, f"{where}['py_modules'][{i}]") for i, m in enumerate(modules)
        ]
    if spec.get("env_vars") is not None:
        env_vars = spec["env_vars"]
        if not isinstance(env_vars, Mapping):
            raise TypeError(f"{where}['env_vars'] must be a dict of str to str, "
                            f"got {type(env_vars).__name__}")
        for name, value in env_vars.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(
                    f"{where}['env_vars'] must map str to str; {name!r}: {value!r} is "
                    f"{type(name).__name__} to {type(value).__name__}"
                )
            if not name or "=" in name or "\0" in name + value:
                raise ValueError(f"{where}['env_vars'] has an invalid variable name {name!r}")
        checked["env_vars"] = dict(env_vars)
    if spec.get("excludes") is not None:
        excludes = spec["excludes"]
        if isinstance(excludes, str) or not all(isinstance(p, str) for p in excludes):
            raise TypeError(f"{where}['excludes'] must be a list of str patterns, "
                            f"got {excludes!r}")
        checked["excludes"] = list(excludes)
    return checked


def check_option(value: Any) -> dict[str, Any] | Env | None:
    """A task's or actor's ``runtime_env`` option: a checked dict, or an Env resolved
    already (as a driver elsewhere sends it)."""
    if value is None or isinstance(value, Env):
        return value
    return check(value, "the runtime_env option")


def merge(base: Mapping[str, Any] | None, over: Mapping[str, Any] | None) -> dict[str, Any]:
    """``over`` laid on ``base`` (both checked): its keys replace, ``env_vars`` merge."""
    merged = dict(base or {})
    for key, value in (over or {}).items():
        if key == "env_vars":
            merged["env_vars"] = {**merged.get("env_vars", {}), **value}
        else:
            merged[key] = value
    return merged


def layer(under: Env | None, over: Env | None) -> Env | None:
    """``over`` laid on ``under`` (a cluster's env under a driver's): fields replace,
    ``env_vars`` merge."""
    if under is None:
        return over
    if over is None:
        return under
    env_vars = dict(under.env_vars)
    env_vars.update(over.env_vars)
    return Env(over.working_dir or under.working_dir, over.py_modules or under.py_modules,
               tuple(sorted(env_vars.items())))


def _directory(value: Any, where: str) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{where} must be a path, got {type(value).__name__}")
    path = os.path.abspath(os.fspath(value))
    if not os.path.isdir(path):
        raise ValueError(f"{where}: {path} is not a directory"
                         + ("" if os.path.exists(path) else " (it does not exist)"))
    return path


def _module_path(value: Any, where: str) -> str:
    """A package's directory or a module's file, from a path or an imported module."""
    if isinstance(value, types.ModuleType):
        file = getattr(value, "__file__", None)
        if not file:
            raise ValueError(f"{where}: module {value.__name__} has no file to ship "
                             "(a built-in or namespace module)")
        if os.path.basename(file).startswith("__init__."):
            return os.path.dirname(os.path.abspath(file))
        return os.path.abspath(file)
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{where} must be a path or a module, got {type(value).__name__}")
    path = os.path.abspath(os.fspath(value))
    if os.path.isdir(path) or (os.path.isfile(path) and path.endswith(".py")):
        return path
    raise ValueError(f"{where}: {path} is neither a package directory nor a .py file"
                     + ("" if os.path.exists(path) else " (it does not exist)"))
