"""From a user's ``runtime_env`` dict to the :class:`Env` a task carries, shipping on the way.

A driver's resolver holds its own ``runtime_env`` (given at ``init``, packed and
shipped then, so a directory too large fails there) and lays a task's dict over
it (``_spec.merge``). Each distinct dict is resolved once per runtime: its
directories are packed (``_pack``) and every package the receiver lacks is
shipped (``ship``: into the local cache, or up to the head); later submits with
the same dict cost a dict lookup. A directory is therefore read when first used,
as Ray reads a job's ``working_dir`` once: edits after that need a new runtime.

A cluster may have an env of its own (``sharedcompute launch``'s ``[runtime_env]``):
the head hands it to each driver that connects, and it lies under everything that
driver resolves (``under``; ``_spec.layer``).

Inside a task (no ``ship``), a child inherits its worker's Env, and may only
add ``env_vars``: a worker has no business packing its host's directories.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from sharedcompute import _config
from sharedcompute._env._pack import DEFAULT_LIMIT, Package, pack
from sharedcompute._env._spec import Env, check, layer, merge
from sharedcompute.errors import RuntimeEnvError

# Ship a package the receiver lacks; returns the bytes that went over the wire (0: it had it).
Ship = Callable[[Package], int]


class EnvResolver:
    def __init__(self, spec: Any = None, ship: Ship | None = None, *,
                 inherited: Env | None = None, under: Env | None = None) -> None:
        self._ship = ship
        self._under = under  # laid beneath every env resolved here (a cluster's own)
        self._lock = threading.Lock()
        self._resolved: dict[str, Env | None] = {}
        self._shipped: set[str] = set()
        self.shipped_bytes = 0  # what went over the wire (figures, tests)
        self.pack_seconds = 0.0
        self._spec = check(spec)
        if self._spec and ship is None:
            raise RuntimeEnvError("runtime_env can only be given to a driver's runtime")
        self.base: Env | None = (
            layer(under, self._resolve(self._spec)) if self._spec else inherited or under
        )

    def resolve(self, spec: Any) -> Env | None:
        """The Env of a task submitted with ``spec`` (None: this runtime's own)."""
        if spec is None or spec is self._spec:
            return self.base
        if isinstance(spec, Env):
            return spec  # resolved already (a driver elsewhere sent it)
        checked = check(spec, "the task's runtime_env")
        if self._ship is None:
            return self._inside_task(checked)
        merged = merge(self._spec, checked)
        return layer(self._under, self._resolve(merged))

    def _inside_task(self, checked: dict[str, Any]) -> Env | None:
        paths = sorted(k for k in ("working_dir", "py_modules") if k in checked)
        if paths:
            raise RuntimeEnvError(
                f"a task cannot ship {' or '.join(paths)} (runtime_env inside a task may "
                "only add env_vars); give them to the driver's init() or .options()"
            )
        base = self.base or Env()
        env_vars = dict(base.env_vars)
        env_vars.update(checked.get("env_vars", {}))
        return _or_none(Env(base.working_dir, base.py_modules, tuple(sorted(env_vars.items()))))

    def _resolve(self, spec: dict[str, Any]) -> Env | None:
        key = repr(sorted(spec.items()))
        with self._lock:  # one thread packs a given dict; others wait for its answer
            if key in self._resolved:
                return self._resolved[key]
            env = self._build(spec)
            self._resolved[key] = env
            return env

    def _build(self, spec: dict[str, Any]) -> Env | None:
        limit = int(_config.get("runtime_env_max_bytes", DEFAULT_LIMIT))
        excludes = spec.get("excludes", ())
        working_dir = None
        if "working_dir" in spec:
            working_dir = self._packed(spec["working_dir"], excludes, limit, as_module=False)
        modules = tuple(self._packed(path, excludes, limit, as_module=True)
                        for path in spec.get("py_modules", ()))
        env_vars = tuple(sorted(spec.get("env_vars", {}).items()))
        return _or_none(Env(working_dir, modules, env_vars))

    def _packed(self, path: str, excludes: Any, limit: int, *, as_module: bool) -> str:
        started = time.perf_counter()
        package = pack(path, excludes, limit=limit, as_module=as_module)
        self.pack_seconds += time.perf_counter() - started
        if package.id not in self._shipped:
            assert self._ship is not None
            self.shipped_bytes += self._ship(package)
            self._shipped.add(package.id)
        return package.id


def _or_none(env: Env) -> Env | None:
    return env if env.packages or env.env_vars else None
