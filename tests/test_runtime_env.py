"""runtime_env without a cluster: packing, the host cache, and a local runtime's workers.

The cluster cases (a driver whose directory the nodes cannot see) are in
``test_cluster_runtime_env.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

import sharedcompute as sc
from sharedcompute._env import Env, EnvResolver, PackageCache, check, merge, pack
from sharedcompute._env._cache import sweep_dead_caches
from sharedcompute._env._pack import Package
from sharedcompute.errors import RuntimeEnvError


def _tree(root: Path, files: dict[str, bytes | str]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
    return root


# -- checking and merging what users write -------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "error", "words"),
    [
        ("x", TypeError, ["must be a dict"]),
        ({"workdir": "."}, ValueError, ["unknown key", "workdir", "working_dir"]),
        ({"working_dir": "/no/such/dir"}, ValueError, ["/no/such/dir", "does not exist"]),
        ({"py_modules": "mod.py"}, TypeError, ["must be a list"]),
        ({"py_modules": ["/no/such.py"]}, ValueError, ["/no/such.py"]),
        ({"env_vars": {"A": 1}}, TypeError, ["'A'", "int"]),
        ({"env_vars": {"A=B": "1"}}, ValueError, ["A=B"]),
        ({"excludes": "*.bin"}, TypeError, ["excludes"]),
    ],
)
def test_bad_runtime_envs_are_refused_naming_what_is_wrong(
    spec: object, error: type[Exception], words: list[str]
) -> None:
    with pytest.raises(error) as raised:
        check(spec)
    for word in words:
        assert word in str(raised.value), str(raised.value)


def test_a_tasks_env_replaces_keys_and_merges_env_vars() -> None:
    base = {"working_dir": "/a", "env_vars": {"A": "1", "B": "1"}}
    assert merge(base, {"env_vars": {"B": "2"}, "working_dir": "/b"}) == {
        "working_dir": "/b", "env_vars": {"A": "1", "B": "2"},
    }


# -- packing ---------------------------------------------------------------------------------


def test_a_package_depends_only_on_names_contents_and_modes(tmp_path: Path) -> None:
    one = _tree(tmp_path / "one", {"a.py": "x = 1\n", "sub/b.txt": "b"})
    two = _tree(tmp_path / "two", {"sub/b.txt": "b", "a.py": "x = 1\n"})
    os.utime(two / "a.py", (1, 1))  # other timestamps, other creation order: same package
    assert pack(str(one)).id == pack(str(two)).id
    (two / "a.py").write_text("x = 2\n")
    assert pack(str(one)).id != pack(str(two)).id


def test_git_pycache_and_excluded_files_are_left_out(tmp_path: Path) -> None:
    root = _tree(tmp_path / "w", {
        "keep.py": "", ".git/HEAD": "ref", "__pycache__/keep.cpython-311.pyc": "",
        "data/big.bin": b"\0" * 1000, "data/small.csv": "1,2", "sub/also.bin": b"1",
        "build/out.txt": "o",
    })
    package = pack(str(root), ["*.bin", "/build"])
    names = zipfile.ZipFile(_as_file(tmp_path, package)).namelist()
    assert sorted(names) == ["data/small.csv", "keep.py"]


def test_a_package_module_keeps_its_name_and_a_module_file_goes_alone(tmp_path: Path) -> None:
    _tree(tmp_path, {"mypkg/__init__.py": "", "mypkg/core.py": "", "solo.py": ""})
    names = zipfile.ZipFile(_as_file(tmp_path, pack(str(tmp_path / "mypkg"), as_module=True)))
    assert sorted(names.namelist()) == ["mypkg/__init__.py", "mypkg/core.py"]
    alone = zipfile.ZipFile(_as_file(tmp_path, pack(str(tmp_path / "solo.py"), as_module=True)))
    assert alone.namelist() == ["solo.py"]


def test_a_directory_over_the_limit_names_its_size_the_limit_and_the_largest_files(
    tmp_path: Path,
) -> None:
    root = _tree(tmp_path / "w", {"big.npy": b"\0" * 300_000, "mid.bin": b"\0" * 200_000,
                                  "code.py": "pass\n"})
    with pytest.raises(RuntimeEnvError) as raised:
        pack(str(root), limit=100_000)
    message = str(raised.value)
    for word in ("488.3 KiB", "97.7 KiB", "big.npy (293.0 KiB)", "mid.bin", "excludes",
                 "runtime_env_max_bytes"):
        assert word in message, message


def test_an_unreadable_file_is_named() -> None:
    top = tempfile.mkdtemp(prefix="sc-unreadable-")
    try:
        os.chmod(top, 0o755)
        root = _tree(Path(top), {"ok.py": "", "secret.txt": "s"})
        (root / "secret.txt").chmod(0)
        as_root = os.geteuid() == 0
        if as_root:  # root reads anything: be nobody for the pack
            os.setegid(65534)
            os.seteuid(65534)
        try:
            with pytest.raises(RuntimeEnvError) as raised:
                pack(str(root))
        finally:
            if as_root:
                os.seteuid(0)
                os.setegid(0)
        assert "secret.txt" in str(raised.value) and "ermission denied" in str(raised.value)
    finally:
        shutil.rmtree(top)


def _as_file(directory: Path, package: Package) -> Path:
    path = directory / f"{package.id}.zip"
    path.write_bytes(package.data)
    return path


# -- the host cache --------------------------------------------------------------------------


def test_a_cache_fetches_a_missing_package_once_and_unpacks_it_once(tmp_path: Path) -> None:
    source = pack(str(_tree(tmp_path / "w", {"mod.py": "V = 7\n", "data.txt": "d"})))
    fetched: list[str] = []

    def fetch(package: str) -> bytes:
        fetched.append(package)
        return source.data

    cache = PackageCache(fetch)
    try:
        env = Env(working_dir=source.id, env_vars=(("K", "V"),))
        first = cache.prepare(env)
        second = cache.prepare(env)
        assert first == second and fetched == [source.id]
        assert first.cwd is not None and Path(first.cwd, "data.txt").read_text() == "d"
        assert first.paths == (first.cwd,) and first.env_vars == {"K": "V"}
    finally:
        cache.close()
    assert not os.path.exists(cache.root)


def test_bytes_that_do_not_match_their_id_are_refused(tmp_path: Path) -> None:
    source = pack(str(_tree(tmp_path / "w", {"mod.py": ""})))
    cache = PackageCache(lambda package: source.data + b"tampered")
    try:
        with pytest.raises(RuntimeEnvError, match="do not match its id"):
            cache.prepare(Env(working_dir=source.id))
        with pytest.raises(RuntimeEnvError, match="is not a package id"):
            cache.zip_path("../../etc/passwd")
    finally:
        cache.close()


def test_the_cache_evicts_least_recently_used_packages_nobody_runs_in(tmp_path: Path) -> None:
    packages = [pack(str(_tree(tmp_path / f"w{i}", {"blob": os.urandom(100_000)})))
                for i in range(3)]
    by_id = {p.id: p.data for p in packages}
    cache = PackageCache(by_id.__getitem__, max_bytes=450_000)
    try:
        in_use = cache.prepare(Env(working_dir=packages[0].id))
        cache.prepare(Env(working_dir=packages[1].id))
        cache.release(Env(working_dir=packages[1].id))
        cache.prepare(Env(working_dir=packages[2].id))  # over the bound: package 1 goes
        assert cache.disk_bytes() <= 450_000
        assert os.path.isdir(str(in_use.cwd))
        assert not os.path.exists(os.path.join(cache.root, "pkgs", packages[1].id))
    finally:
        cache.close()


def test_caches_of_killed_processes_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, timeout=60)
    dead_pid = int(dead.stdout)
    (tmp_path / f"sharedcompute-env-{dead_pid}-abc").mkdir()
    (tmp_path / f"sharedcompute-env-{os.getpid()}-def").mkdir()
    assert sweep_dead_caches(str(tmp_path)) == [f"sharedcompute-env-{dead_pid}-abc"]
    assert (tmp_path / f"sharedcompute-env-{os.getpid()}-def").exists()


def test_a_resolver_packs_and_ships_each_dict_once(tmp_path: Path) -> None:
    root = _tree(tmp_path / "w", {"m.py": ""})
    shipped: list[str] = []

    def ship(package: Package) -> int:
        shipped.append(package.id)
        return len(package.data)

    resolver = EnvResolver({"working_dir": str(root), "env_vars": {"A": "1"}}, ship)
    assert resolver.base is not None and resolver.base.env_vars == (("A", "1"),)
    again = resolver.resolve({"env_vars": {"B": "2"}})
    assert again is not None and again.working_dir == resolver.base.working_dir
    assert again.env_vars == (("A", "1"), ("B", "2"))
    assert resolver.resolve({"env_vars": {"B": "2"}}) is again
    assert shipped == [resolver.base.working_dir]
    inside = EnvResolver(inherited=again)
    assert inside.resolve(None) is again
    with pytest.raises(RuntimeEnvError, match="cannot ship working_dir"):
        inside.resolve({"working_dir": str(root)})


# -- a local runtime: workers started in the env --------------------------------------------------


def _read_here() -> tuple[str, str | None, str]:
    import helper_mod  # type: ignore[import-not-found]  # only in the shipped working_dir

    return (Path("data.txt").read_text(), os.environ.get("SC_TEST_VAR"), helper_mod.NAME)


def test_a_local_runtime_runs_tasks_in_the_shipped_working_dir(tmp_path: Path) -> None:
    root = _tree(tmp_path / "w", {"data.txt": "hello", "helper_mod.py": "NAME = 'shipped'\n"})
    with sc.Runtime(num_workers=2, runtime_env={
        "working_dir": str(root), "env_vars": {"SC_TEST_VAR": "set"},
    }):
        assert sc.submit(_read_here).result(timeout=60) == ("hello", "set", "shipped")
        # A per-task env_vars merges over the runtime's; the worker restarts for it.
        remote = sc.remote(_read_here)
        other = remote.options(runtime_env={"env_vars": {"SC_TEST_VAR": "task"}})
        assert other.submit().result(timeout=60) == ("hello", "task", "shipped")
    # The runtime's cache went with it.
    assert not [p for p in os.listdir(os.path.dirname(str(tmp_path)))
                if p.startswith(f"sharedcompute-env-{os.getpid()}-")]


def _env_var() -> str | None:
    return os.environ.get("SC_TEST_VAR")


def test_tasks_with_and_without_an_env_share_a_pool_without_mixing() -> None:
    with sc.Runtime(num_workers=2):
        plain = sc.remote(_env_var)
        with_env = plain.options(runtime_env={"env_vars": {"SC_TEST_VAR": "x"}})
        futures = []
        for _ in range(10):
            futures.append(with_env.submit())
            futures.append(plain.submit())
        values = [f.result(timeout=60) for f in futures]
        assert values == ["x", None] * 10
        started = time.perf_counter()
        assert with_env.submit().result(timeout=60) == "x"
        assert time.perf_counter() - started < 30


@sc.remote
class _EnvReader:
    def read(self) -> tuple[str | None, str]:
        return os.environ.get("SC_TEST_VAR"), os.getcwd()


def test_an_actor_runs_in_its_own_runtime_env(tmp_path: Path) -> None:
    root = _tree(tmp_path / "w", {"data.txt": "x"})
    with sc.Runtime(num_workers=1):
        actor = _EnvReader.options(runtime_env={
            "working_dir": str(root), "env_vars": {"SC_TEST_VAR": "actor"},
        }).remote()
        value, cwd = actor.read.remote().result(timeout=60)
        assert value == "actor" and os.path.exists(os.path.join(cwd, "data.txt"))
        plain = _EnvReader.remote()
        assert plain.read.remote().result(timeout=60)[0] is None


def _import_missing() -> None:
    import sc_module_nowhere  # type: ignore[import-not-found]  # noqa: F401


def test_a_module_a_worker_cannot_import_names_it_the_node_and_runtime_env() -> None:
    with sc.Runtime(num_workers=1), pytest.raises(ModuleNotFoundError) as raised:
        sc.submit(_import_missing).result(timeout=60)
    message = str(raised.value)
    assert "'sc_module_nowhere'" in message and "node 0" in message, message
    assert "runtime_env" in message and raised.value.name == "sc_module_nowhere"


def _nothing() -> int:
    return 1


def test_an_env_whose_package_this_host_cannot_get_fails_its_tasks_naming_why() -> None:
    missing = Env(working_dir="pkg-" + "0" * 40)
    with sc.Runtime(num_workers=1):
        broken = sc.remote(_nothing).options(runtime_env=missing)
        with pytest.raises(RuntimeEnvError) as raised:
            broken.submit().result(timeout=60)
        assert "pkg-0000" in str(raised.value) and "node 0" in str(raised.value)
        assert sc.submit(_nothing).result(timeout=60) == 1  # other tasks are not held up


def test_a_clusters_env_lies_under_a_drivers_own(tmp_path: Path) -> None:
    from sharedcompute._env._spec import layer

    cluster = Env(working_dir="pkg-c", env_vars=(("A", "1"), ("B", "1")))
    driver = Env(py_modules=("pkg-m",), env_vars=(("B", "2"),))
    assert layer(cluster, driver) == Env("pkg-c", ("pkg-m",), (("A", "1"), ("B", "2")))
    assert layer(None, driver) is driver and layer(cluster, None) is cluster
    root = _tree(tmp_path / "w", {"m.py": ""})
    resolver = EnvResolver({"working_dir": str(root)}, lambda package: 0, under=cluster)
    assert resolver.base is not None and resolver.base.env_vars == cluster.env_vars
    assert resolver.base.working_dir != "pkg-c"
    assert EnvResolver(None, lambda package: 0, under=cluster).base is cluster


def test_a_launch_files_runtime_env_takes_paths_relative_to_it(tmp_path: Path) -> None:
    from sharedcompute._launch import LaunchError, load

    (tmp_path / "proj").mkdir()
    path = tmp_path / "cluster.toml"
    path.write_text('[head]\nhost = "10.0.0.1"\n[runtime_env]\nworking_dir = "proj"\n'
                    'env_vars = { K = "V" }\n')
    assert load(path).runtime_env == {"working_dir": str(tmp_path / "proj"),
                                      "env_vars": {"K": "V"}}
    path.write_text('[head]\nhost = "10.0.0.1"\n[runtime_env]\nworking_dir = "nowhere"\n')
    with pytest.raises(LaunchError, match=r"nowhere.*does not exist"):
        load(path)
