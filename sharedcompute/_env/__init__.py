"""runtime_env: a driver's code and data shipped to the hosts that run its work.

``_spec`` checks and merges what users write and defines the :class:`Env` a task
carries; ``_pack`` turns a directory into a content-addressed zip; ``_resolve``
goes from a dict to an Env, shipping what the receiver lacks; ``_cache`` keeps a
host's packages and sets them up for workers. Below the runtime: nothing here
knows of workers, schedulers or sockets (a runtime passes ``ship``/``fetch`` in).
"""

from sharedcompute._env._cache import PackageCache, WorkerEnv, sweep_dead_caches
from sharedcompute._env._pack import Package, pack
from sharedcompute._env._resolve import EnvResolver
from sharedcompute._env._spec import Env, check, check_option, merge

__all__ = [
    "Env",
    "EnvResolver",
    "Package",
    "PackageCache",
    "WorkerEnv",
    "check",
    "check_option",
    "merge",
    "pack",
    "sweep_dead_caches",
]
