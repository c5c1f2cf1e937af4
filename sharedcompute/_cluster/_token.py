"""Where the cluster token comes from, and how a new one is made and kept.

Every process of a cluster (head, node, driver, the ``sharedcompute`` command)
finds the token the same way, first match wins:

1. ``SHAREDCOMPUTE_TOKEN`` (the token itself);
2. the file named by ``--token-file``, else by ``SHAREDCOMPUTE_TOKEN_FILE``: read,
   whitespace stripped, if it exists; created with a new token if it does not;
3. ``token`` in the sharedcompute home (``$SHAREDCOMPUTE_HOME``, default
   ``~/.sharedcompute``), which ``start --head`` creates when nothing else names one.

A new token is 32 random bytes as hex, written to a file of mode 0600 in a
directory of mode 0700. A token file that others may read is refused, as ssh
refuses such a key: whoever reads it controls the cluster. The token never
appears on a command line or in a log.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from sharedcompute.errors import AuthenticationError

TOKEN_ENV = "SHAREDCOMPUTE_TOKEN"
TOKEN_FILE_ENV = "SHAREDCOMPUTE_TOKEN_FILE"
HOME_ENV = "SHAREDCOMPUTE_HOME"


def home() -> Path:
    """The directory of this host's sharedcompute files (token, pids, logs)."""
    return Path(os.environ.get(HOME_ENV) or "~/.sharedcompute").expanduser()


def new_token() -> str:
    return secrets.token_hex(32)


def write_token(path: Path) -> str:
    """Create ``path`` holding a new token (mode 0600); refuse to replace one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = new_token()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def read_token(path: Path) -> str:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuthenticationError(
            f"the token file {path} may be read by other users (mode {stat.filemode(mode)}); "
            f"make it private: chmod 600 {path}"
        )
    token = path.read_text().strip()
    if not token:
        raise AuthenticationError(f"the token file {path} is empty")
    return token


def find_token(token_file: str | os.PathLike[str] | None = None, *, create: bool = False) -> str:
    """The cluster token, found as the module docstring says.

    ``create``: make the home's token file if nothing names a token (the head does).
    """
    from_env = os.environ.get(TOKEN_ENV, "").strip()
    if from_env:
        return from_env
    named = token_file or os.environ.get(TOKEN_FILE_ENV)
    if named:
        path = Path(named).expanduser()
        return read_token(path) if path.exists() else write_token(path)
    path = home() / "token"
    if path.exists():
        return read_token(path)
    if create:
        return write_token(path)
    raise AuthenticationError(
        f"no cluster token here: set {TOKEN_ENV}, or {TOKEN_FILE_ENV} or --token-file to a "
        f"file holding it, or copy the head's {path} to this host"
    )
