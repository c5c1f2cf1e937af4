"""Objects pulled from one node's store into another's over a real TCP data connection:
the bytes land straight in the destination store, a copy is pulled once however many
readers ask at once, and nothing is left allocated when a pull fails."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from sharedcompute._cluster._transfer import Puller, TransferServer
from sharedcompute._store import OwnerStore, RemoteObject
from sharedcompute.errors import AuthenticationError, ObjectLostError

TOKEN = b"k" * 64
MiB = 1024 * 1024
SOURCE_NODE = 7


@pytest.fixture
def nodes() -> Iterator[tuple[OwnerStore, TransferServer, OwnerStore, Puller]]:
    source, destination = OwnerStore(64 * MiB), OwnerStore(64 * MiB)
    server = TransferServer(source, TOKEN)
    puller = Puller(destination, TOKEN)
    puller.addresses[SOURCE_NODE] = server.address
    try:
        yield source, server, destination, puller
    finally:
        puller.close()
        server.close()
        destination.close()
        source.close()


def remote(source: OwnerStore, value: object) -> RemoteObject:
    ref = source.put(value)
    return RemoteObject(SOURCE_NODE, ref.object_id, ref.nbytes, ref.header)


def test_a_pulled_array_is_equal_and_lives_in_the_destination_store(nodes) -> None:
    source, server, destination, puller = nodes
    value = np.arange(4 * MiB, dtype=np.int32)  # 16 MiB
    ref = remote(source, value)
    copy = puller.pull(ref, timeout=30)
    assert destination.stats()["num_objects"] == 1
    pulled = destination.get(copy)
    np.testing.assert_array_equal(pulled, value)
    assert not pulled.flags.writeable
    assert server.served == 1 and server.bytes_served == ref.nbytes
    del pulled


def test_a_copy_already_here_is_not_pulled_again_and_forget_frees_it(nodes) -> None:
    source, server, destination, puller = nodes
    ref = remote(source, np.ones(MiB))
    first = puller.pull(ref, timeout=30)
    assert puller.pull(ref, timeout=30) is first
    assert puller.local(ref) is first
    assert server.served == 1
    puller.forget(ref.node, ref.object_id)
    assert destination.stats()["num_objects"] == 0
    puller.pull(ref, timeout=30)
    assert server.served == 2


def test_concurrent_readers_of_one_object_share_one_pull(nodes) -> None:
    source, server, destination, puller = nodes
    ref = remote(source, np.ones(8 * MiB, dtype=np.uint8))
    results: list[object] = []
    start = threading.Barrier(6)

    def read() -> None:
        start.wait(timeout=30)
        results.append(puller.pull(ref, timeout=30))

    threads = [threading.Thread(target=read) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 6 and all(r is results[0] for r in results)
    assert server.served == 1
    assert destination.stats()["num_objects"] == 1


def test_an_object_freed_at_its_node_is_lost_with_a_clear_error_and_nothing_allocated(
    nodes,
) -> None:
    source, _, destination, puller = nodes
    stored = source.put(np.ones(MiB))
    ref = RemoteObject(SOURCE_NODE, stored.object_id, stored.nbytes, stored.header)
    source.delete(stored)
    assert source.stats()["num_objects"] == 0
    with pytest.raises(ObjectLostError, match=f"node {SOURCE_NODE}"):
        puller.pull(ref, timeout=30)
    assert destination.stats()["num_objects"] == 0
    # The connection stays good for the next pull.
    assert destination.get(puller.pull(remote(source, np.ones(MiB)), timeout=30)).sum() == MiB


def test_an_unknown_node_is_named(nodes) -> None:
    _, _, _, puller = nodes
    with pytest.raises(ObjectLostError, match="node 99, which is not known"):
        puller.pull(RemoteObject(99, 1, MiB, b""), timeout=30)


def test_a_wrong_token_is_refused_and_the_server_serves_others(nodes) -> None:
    source, server, destination, puller = nodes
    intruder = Puller(destination, b"w" * 64)
    intruder.addresses[SOURCE_NODE] = server.address
    ref = remote(source, np.ones(MiB))
    try:
        with pytest.raises(AuthenticationError):
            intruder.pull(ref, timeout=30)
    finally:
        intruder.close()
    assert server.served == 0
    assert destination.stats()["num_objects"] == 0
    np.testing.assert_array_equal(destination.get(puller.pull(ref, timeout=30)), np.ones(MiB))


def test_a_server_gone_mid_way_loses_the_object_and_frees_the_block(nodes) -> None:
    source, server, destination, puller = nodes
    ref = remote(source, np.ones(MiB))
    server.close()
    with pytest.raises(ObjectLostError, match="could not be pulled"):
        puller.pull(ref, timeout=30)
    assert destination.stats()["num_objects"] == 0
