"""runtime_env on three hosts, with a driver whose code no node can see.

The driver runs on host 1 in a mount namespace of its own, its project on a
private tmpfs (``ThreeHosts.private_driver``): its module ``mylib``, a data file
and a package exist nowhere else, so anything not shipped fails for real, as on
a second machine. Nodes: the head's (0, host 0), 1 (host 1), 2 (host 2).
Skipped, saying why, where namespaces cannot be made (not root).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from _hosts import ThreeHosts

from tools import netns

pytestmark = pytest.mark.skipif(netns.available() is not None,
                                reason=f"no network namespaces here: {netns.available()}")

MYLIB = '''
import os


def clean(x):
    return x * 2


def read_data():
    with open("data/table.csv") as file:  # relative to the working directory
        return file.read()


def use_pkg(x):
    import mypkg

    return mypkg.twice(x)


def getenv(name):
    return os.environ.get(name)


def listing():
    return sorted(os.listdir("."))


class Counter:
    def __init__(self):
        self.n = 0

    def incr(self, k):
        self.n += k
        return self.n, os.environ.get("SC_ACTOR")
'''

DRIVER = '''
import json, os, sys
sys.path.insert(0, os.path.abspath("../libs"))  # mypkg, for this driver
import sharedcompute as sc
import mylib

mode = sys.argv[1]
out = {}
if mode == "bare":
    # Too large (big.bin is not excluded here): init fails, naming sizes and the file.
    try:
        with sc.config.set(runtime_env_max_bytes=1 << 20):
            sc.init(runtime_env={"working_dir": "."})
    except Exception as error:
        out["too_large"] = [type(error).__name__, str(error)]
    sc.init()  # nothing shipped: the node cannot import mylib
    try:
        sc.remote(mylib.clean).options(node=2).submit(1).result(timeout=60)
        out["error"] = None
    except Exception as error:
        out["error"] = [type(error).__name__, str(error)]
else:
    rt = sc.init(runtime_env={
        "working_dir": ".", "py_modules": ["../libs/mypkg"], "excludes": ["*.bin"],
        "env_vars": {"SC_ACTOR": "from-driver"},
    })
    out["shipped"] = rt.envs.shipped_bytes
    clean = sc.remote(mylib.clean)
    out["clean"] = sc.get([clean.options(node=n).submit(n + 1) for n in (0, 1, 2)],
                          timeout=120)
    out["data"] = sc.remote(mylib.read_data).options(node=2).submit().result(timeout=60)
    out["pkg"] = sc.remote(mylib.use_pkg).options(node=2).submit(21).result(timeout=60)
    getenv = sc.remote(mylib.getenv).options(node=2)
    out["env_task"] = getenv.options(
        runtime_env={"env_vars": {"SC_X": "task"}}).submit("SC_X").result(timeout=60)
    out["env_plain"] = getenv.submit("SC_X").result(timeout=60)
    out["listing"] = sc.remote(mylib.listing).options(node=2).submit().result(timeout=60)
    counter = sc.remote(mylib.Counter).options(node=2).remote()
    out["actor"] = counter.incr.remote(5).result(timeout=60)
print(json.dumps(out))
'''


def _project(root: Path) -> Path:
    files = {
        "proj/mylib.py": MYLIB,
        "proj/driver.py": DRIVER,
        "proj/data/table.csv": "a,b\n1,2\n",
        "libs/mypkg/__init__.py": "def twice(x):\n    return 2 * x\n",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    with open(root / "proj" / "big.bin", "wb") as file:  # excluded: never shipped
        file.truncate(8 << 20)
    return root


@pytest.mark.timeout(400)
def test_a_driver_ships_its_code_data_and_package_to_nodes_that_lack_them(
    three_hosts: ThreeHosts, tmp_path: Path
) -> None:
    tree = _project(tmp_path / "src")
    first = three_hosts.private_driver(1, tree, "proj", "driver.py", "shipped")
    assert first["clean"] == [2, 4, 6]  # mylib from the driver's own directory, on every node
    assert first["data"] == "a,b\n1,2\n"
    assert first["pkg"] == 42
    assert first["env_task"] == "task" and first["env_plain"] is None
    listing = first["listing"]
    assert isinstance(listing, list) and "mylib.py" in listing and "big.bin" not in listing
    assert first["actor"] == [5, "from-driver"]
    shipped = first["shipped"]
    assert isinstance(shipped, int) and 0 < shipped < 64 * 1024  # big.bin stayed home
    # A second driver with the same directory: the head has every package already.
    second = three_hosts.private_driver(1, tree, "proj", "driver.py", "shipped")
    assert second["shipped"] == 0 and second["clean"] == [2, 4, 6]


@pytest.mark.timeout(300)
def test_without_runtime_env_the_node_says_which_module_it_lacks(
    three_hosts: ThreeHosts, tmp_path: Path
) -> None:
    tree = _project(tmp_path / "src")
    said = three_hosts.private_driver(1, tree, "proj", "driver.py", "bare")
    kind, message = said["error"]  # type: ignore[misc]
    assert kind == "ModuleNotFoundError", said
    for words in ("'mylib'", "node 2", "runtime_env"):
        assert words in message, message
    kind, message = said["too_large"]  # type: ignore[misc]
    assert kind == "RuntimeEnvError", said
    for words in ("8.0 MiB", "1.0 MiB", "big.bin", "excludes"):
        assert words in message, message
