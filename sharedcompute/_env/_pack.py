"""A directory or module as a content-addressed zip: the unit a runtime_env ships.

``pack(path, excludes, limit)`` walks the path (a ``working_dir``'s contents go
at the zip's root; a package ``mypkg/`` goes in as ``mypkg/...`` and a module
file as ``mod.py``, so the unpacked directory is what goes on ``sys.path``),
leaves out ``.git``, ``__pycache__`` and what the gitignore-style ``excludes``
match, refuses more than ``limit`` bytes of files before reading any (naming the
largest), and writes a zip that depends only on the files' names, contents and
modes: entries sorted, every timestamp 1980-01-01. Its id is ``pkg-`` and the
SHA-256 of those bytes, so the same tree is the same package on every host and
an upload is skipped when the receiver has the id.

Small files are deflated (source code shrinks 3-4x on the wire); files of a MiB
and more are stored as they are, since data files rarely shrink and deflating
them would cost more time than the link saves.

``unpack`` extracts into a temporary sibling and renames it into place, so a
reader never sees half a package and a crash leaves only a temporary to sweep.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass

from sharedcompute.errors import RuntimeEnvError

ALWAYS_EXCLUDED = (".git/", "__pycache__/", "*.pyc")
DEFAULT_LIMIT = 512 * 1024 * 1024
_DEFLATE_BELOW = 1024 * 1024
_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class Package:
    id: str
    data: bytes
    files: int
    file_bytes: int  # before compression


def pack(path: str, excludes: list[str] | tuple[str, ...] = (), *,
         limit: int = DEFAULT_LIMIT, as_module: bool = False) -> Package:
    """Zip ``path`` (a directory's contents; with ``as_module``, the package or module
    itself under its own name)."""
    files = _files(path, excludes, as_module)
    total = sum(size for _, _, size, _ in files)
    if total > limit:
        largest = sorted(files, key=lambda f: -f[2])[:5]
        named = ", ".join(f"{arcname} ({_size(size)})" for arcname, _, size, _ in largest)
        raise RuntimeEnvError(
            f"runtime_env: {path} holds {_size(total)} of files, over the limit of "
            f"{_size(limit)} (sc.config.set(runtime_env_max_bytes=...) raises it); the "
            f"largest: {named}; leave files out with runtime_env['excludes']"
        )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for arcname, source, size, mode in files:
            info = zipfile.ZipInfo(arcname, _EPOCH)
            info.external_attr = (stat.S_IFREG | (mode & 0o777)) << 16
            info.compress_type = zipfile.ZIP_DEFLATED if size < _DEFLATE_BELOW else (
                zipfile.ZIP_STORED
            )
            try:
                with open(source, "rb") as file, archive.open(info, "w", force_zip64=True) as out:
                    shutil.copyfileobj(file, out, 1024 * 1024)
            except OSError as error:
                raise RuntimeEnvError(
                    f"runtime_env: cannot read {source}: {error.strerror or error}"
                ) from error
    data = buffer.getvalue()
    return Package("pkg-" + hashlib.sha256(data).hexdigest()[:40], data, len(files), total)


def _files(path: str, excludes: list[str] | tuple[str, ...],
           as_module: bool) -> list[tuple[str, str, int, int]]:
    """(name in the zip, file, size, mode) of every file to ship, sorted by name."""
    import pathspec  # here: a worker imports this module, and never packs

    spec = pathspec.GitIgnoreSpec.from_lines([*ALWAYS_EXCLUDED, *excludes])
    if os.path.isfile(path):
        name = os.path.basename(path)
        return [(name, path, *_stat(path))]
    prefix = os.path.basename(path.rstrip(os.sep)) + "/" if as_module else ""
    found: list[tuple[str, str, int, int]] = []

    def refuse(error: OSError) -> None:
        raise RuntimeEnvError(
            f"runtime_env: cannot read {error.filename or path}: {error.strerror or error}"
        ) from error

    for root, dirs, names in os.walk(path, onerror=refuse):
        relative = os.path.relpath(root, path).replace(os.sep, "/")
        relative = "" if relative == "." else relative + "/"
        dirs[:] = sorted(d for d in dirs if not spec.match_file(relative + d + "/"))
        for name in names:
            rel = relative + name
            if spec.match_file(rel):
                continue
            source = os.path.join(root, name)
            if not os.path.isfile(source):
                continue  # a socket, a fifo or a dangling link: nothing to ship
            found.append((prefix + rel, source, *_stat(source)))
    found.sort()
    return found


def _stat(path: str) -> tuple[int, int]:
    try:
        info = os.stat(path)
    except OSError as error:
        raise RuntimeEnvError(
            f"runtime_env: cannot read {path}: {error.strerror or error}"
        ) from error
    if not os.access(path, os.R_OK):
        raise RuntimeEnvError(f"runtime_env: cannot read {path}: permission denied")
    return info.st_size, info.st_mode


def unpack(zip_path: str, destination: str) -> None:
    """Extract the package at ``zip_path`` to ``destination`` (absent), all or nothing."""
    parent = os.path.dirname(destination)
    staging = tempfile.mkdtemp(prefix=".unpacking-", dir=parent)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for info in archive.infolist():
                target = archive.extract(info, staging)
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    os.chmod(target, mode)
        os.rename(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"
