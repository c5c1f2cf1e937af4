"""A host's packages: zips by id, unpacked once, set up for the workers that need them.

::

    driver ──pack──▶ zip ──ship──▶ head's PackageCache (zips/<id>.zip, kept while it runs)
                                        ▲ fetch (missing ids only)
    node's PackageCache ────────────────┘ ──unpack once──▶ pkgs/<id>/ ──▶ worker: cwd, sys.path

Every runtime that starts workers in an env owns one cache: a private directory
``sharedcompute-env-<pid>-<random>`` under the system temp dir, removed when the
runtime closes. A cache left by a process that was killed is swept by the next
one to start on the host: its pid is dead (a live pid, even a reused one, is
never touched, so a second runtime running beside it is safe).

State: ``_zips`` and ``_unpacked`` (id -> bytes on disk), ``_used`` (id -> the
order it was last needed in, for LRU), ``_users`` (id -> live workers set up
with it; never evicted while above zero) and ``_pinned`` (zips a driver shipped
here: other hosts fetch them from here, so they stay until the cache closes).
Past ``max_bytes`` the least recently used packages nobody runs in go.

Every zip's bytes are checked against its id (the SHA-256 in it) before use, so
a corrupted or substituted package is refused, naming the id.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sharedcompute._env._pack import unpack
from sharedcompute._env._spec import Env
from sharedcompute._files import make_own_dir, sweep_dead
from sharedcompute.errors import RuntimeEnvError

DEFAULT_CACHE_BYTES = 4 << 30
_PREFIX = "sharedcompute-env-"


@dataclass(frozen=True, slots=True)
class WorkerEnv:
    """An env set up on this host: what a worker process starts with."""

    env: Env
    cwd: str | None = None
    paths: tuple[str, ...] = ()  # first on sys.path, in this order
    env_vars: dict[str, str] = field(default_factory=dict)


class PackageCache:
    def __init__(self, fetch: Callable[[str], bytes] | None = None, *,
                 max_bytes: int = DEFAULT_CACHE_BYTES, where: str = "this host") -> None:
        self._fetch = fetch  # the head's copy of a package this host lacks
        self.max_bytes = max_bytes
        self.where = where
        self.root = make_own_dir(_PREFIX)
        os.mkdir(os.path.join(self.root, "zips"))
        os.mkdir(os.path.join(self.root, "pkgs"))
        self._lock = threading.Lock()
        self._unpacking: dict[str, threading.Lock] = {}
        self._zips: dict[str, int] = {}
        self._unpacked: dict[str, int] = {}
        self._used: dict[str, int] = {}
        self._users: dict[str, int] = {}
        self._pinned: set[str] = set()
        self._clock = itertools.count()
        self.fetched_bytes = 0
        self.closed = False

    # -- zips ---------------------------------------------------------------------------------

    def has(self, package: str) -> bool:
        with self._lock:
            return package in self._zips

    def missing(self, packages: list[str] | tuple[str, ...]) -> list[str]:
        with self._lock:
            return [p for p in packages if p not in self._zips]

    def add(self, package: str, data: bytes | bytearray | memoryview, *, pin: bool = False) -> None:
        """Keep a package's zip (checked against its id); ``pin``: shipped here by a driver."""
        _check(package, data)
        path = self.zip_path(package)
        with self._lock:
            known = package in self._zips
            if pin:
                self._pinned.add(package)
        if not known:
            staging = f"{path}.{threading.get_ident()}.tmp"
            try:
                with open(staging, "wb") as file:
                    file.write(data)
                os.replace(staging, path)
            except OSError as error:
                with contextlib.suppress(OSError):
                    os.unlink(staging)
                raise RuntimeEnvError(
                    f"runtime_env: cannot keep package {package} on {self.where} in "
                    f"{self.root}: {error.strerror or error}"
                ) from error
            with self._lock:
                self._zips[package] = len(data)
                self._used[package] = next(self._clock)
        self._evict()

    def read(self, package: str) -> bytes:
        """A package's zip, for a host that fetches it from here."""
        try:
            with open(self.zip_path(package), "rb") as file:
                data = file.read()
        except FileNotFoundError:
            raise RuntimeEnvError(
                f"runtime_env: package {package} is not on {self.where} (was it shipped "
                "by a driver of this cluster?)"
            ) from None
        with self._lock:
            self._used[package] = next(self._clock)
        return data

    def zip_path(self, package: str) -> str:
        if not package.startswith("pkg-") or not package[4:].isalnum():
            raise RuntimeEnvError(f"runtime_env: {package!r} is not a package id")
        return os.path.join(self.root, "zips", package + ".zip")

    # -- setting up a worker's env ---------------------------------------------------------------

    def prepare(self, env: Env) -> WorkerEnv:
        """Unpack what ``env`` needs (fetching what this host lacks) and count one user of
        each package until :meth:`release`."""
        directories = [self._unpacked_dir(package) for package in env.packages]
        with self._lock:
            for package in env.packages:
                self._users[package] = self._users.get(package, 0) + 1
        cwd = directories[0] if env.working_dir else None
        return WorkerEnv(env, cwd, tuple(directories), dict(env.env_vars))

    def release(self, env: Env) -> None:
        with self._lock:
            for package in env.packages:
                left = self._users.get(package, 0) - 1
                if left > 0:
                    self._users[package] = left
                else:
                    self._users.pop(package, None)
        self._evict()

    def _unpacked_dir(self, package: str) -> str:
        directory = os.path.join(self.root, "pkgs", package)
        with self._lock:
            lock = self._unpacking.setdefault(package, threading.Lock())
        with lock:  # one thread unpacks a package; the others wait for it
            with self._lock:
                if package in self._unpacked:
                    self._used[package] = next(self._clock)
                    return directory
            if not self.has(package):
                self._get(package)
            try:
                unpack(self.zip_path(package), directory)
            except (OSError, ValueError) as error:
                raise RuntimeEnvError(
                    f"runtime_env: cannot unpack package {package} on {self.where} into "
                    f"{directory}: {error}"
                ) from error
            with self._lock:
                self._unpacked[package] = _disk_bytes(directory)
                self._used[package] = next(self._clock)
        self._evict()
        return directory

    def _get(self, package: str) -> None:
        if self._fetch is None:
            raise RuntimeEnvError(f"runtime_env: package {package} is not on {self.where}")
        try:
            data = self._fetch(package)
        except RuntimeEnvError:
            raise
        except Exception as error:
            raise RuntimeEnvError(
                f"runtime_env: {self.where} cannot fetch package {package} from the head: "
                f"{type(error).__name__}: {error}"
            ) from error
        self.fetched_bytes += len(data)
        self.add(package, data)

    # -- bounds and cleanup -------------------------------------------------------------------

    def disk_bytes(self) -> int:
        with self._lock:
            return sum(self._zips.values()) + sum(self._unpacked.values())

    def _evict(self) -> None:
        """Past ``max_bytes``, drop the least recently used packages that no worker runs in."""
        doomed: list[tuple[str, bool, bool]] = []
        with self._lock:
            total = sum(self._zips.values()) + sum(self._unpacked.values())
            for package in sorted(self._used, key=self._used.__getitem__):
                if total <= self.max_bytes:
                    break
                if self._users.get(package):
                    continue
                drop_zip = package in self._zips and package not in self._pinned
                drop_dir = package in self._unpacked
                if not (drop_zip or drop_dir):
                    continue
                total -= (self._zips.pop(package, 0) if drop_zip else 0)
                total -= self._unpacked.pop(package, 0)
                if package not in self._zips:
                    del self._used[package]
                doomed.append((package, drop_zip, drop_dir))
        for package, drop_zip, drop_dir in doomed:
            if drop_dir:
                shutil.rmtree(os.path.join(self.root, "pkgs", package), ignore_errors=True)
            if drop_zip:
                with contextlib.suppress(OSError):
                    os.unlink(self.zip_path(package))

    def close(self) -> None:
        self.closed = True
        shutil.rmtree(self.root, ignore_errors=True)


def _check(package: str, data: bytes | bytearray | memoryview) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if not package.startswith("pkg-") or not digest.startswith(package[4:]) or len(package) < 20:
        raise RuntimeEnvError(
            f"runtime_env: the bytes received for package {package} do not match its id "
            f"(their SHA-256 is {digest[:40]}): refused"
        )


def _disk_bytes(directory: str) -> int:
    total = 0
    for root, _, names in os.walk(directory):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def sweep_dead_caches(directory: str | None = None) -> list[str]:
    """Remove the caches of processes that are gone (killed before they could); returns them."""
    return sweep_dead(directory or tempfile.gettempdir(), _PREFIX)
