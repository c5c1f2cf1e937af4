"""Actors: a stateful parameter store fed by tasks, and a pool of workers-with-state.

Run: python examples/actors.py
"""

from __future__ import annotations

import numpy as np

import sharedcompute as sc


@sc.remote
class ParameterStore:
    """Holds model weights in a process of its own; tasks pull and push through a handle."""

    def __init__(self, size: int) -> None:
        self.weights = np.zeros(size)
        self.updates = 0

    def get(self) -> np.ndarray:
        return self.weights

    def apply(self, gradient: np.ndarray) -> int:
        self.weights = self.weights - 0.1 * gradient
        self.updates += 1
        return self.updates


def gradient(store: sc.ActorHandle, seed: int) -> int:
    """A task: read the current weights from the actor, push a gradient back."""
    weights = store.get.remote().result(timeout=60)
    target = np.random.default_rng(seed).standard_normal(weights.shape)
    return store.apply.remote(weights - target).result(timeout=60)


@sc.remote
class Tokenizer:
    def __init__(self) -> None:
        self.seen = 0

    def count(self, text: str) -> int:
        self.seen += 1
        return len(text.split())


def main() -> None:
    with sc.Runtime(num_workers=2):
        store = ParameterStore.options(name="params").remote(1_000_000)
        updates = sc.gather([sc.submit(gradient, store, seed) for seed in range(8)], timeout=120)
        print("updates applied:", sorted(updates))
        weights = sc.get_actor("params").get.remote().result(timeout=60)
        print(f"weights after 8 updates: mean {weights.mean():+.4f}, read-only view: "
              f"{not weights.flags.writeable}")

        pool = sc.ActorPool([Tokenizer.remote() for _ in range(2)])
        texts = ["the quick brown fox", "jumps over", "the lazy dog", "again and again"]
        print("word counts:", list(pool.map(lambda actor, text: actor.count.remote(text), texts)))
        sc.kill(store)


if __name__ == "__main__":
    main()
