"""The shared-memory object store, with real processes and real shared memory."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pyarrow as pa
import pytest

from sharedcompute._store import (
    INLINE_THRESHOLD,
    ClientStore,
    InlineObject,
    OwnerStore,
    StoredObject,
)
from sharedcompute.errors import ObjectLostError, ObjectStoreFullError

MiB = 1024 * 1024
TIMEOUT = 60


@pytest.fixture
def store():
    with OwnerStore(capacity=512 * MiB) as owner:
        yield owner


def run_python(code: str, *args: str, timeout: float = TIMEOUT) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def shmem_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1])
    raise AssertionError("no Shmem line in /proc/meminfo")


def test_large_array_round_trips_as_readonly_aligned_view(store):
    array = np.arange(MiB, dtype=np.float64)
    ref = store.put(array)
    assert isinstance(ref, StoredObject)
    assert ref.offset % 64 == 0
    value = store.get(ref)
    np.testing.assert_array_equal(value, array)
    assert not value.flags.writeable
    address = value.__array_interface__["data"][0]
    assert store.segment.address <= address < store.segment.address + store.capacity
    assert address % 64 == 0
    with pytest.raises(ValueError):
        value[0] = 1.0


def test_buffer_is_an_arrow_buffer_over_shared_memory(store):
    ref = store.put(np.ones(MiB, dtype=np.uint8))
    buf = store.buffer(ref)
    assert isinstance(buf, pa.Buffer)
    assert not buf.is_mutable
    assert buf.address == store.segment.address + ref.offset
    assert buf.size == ref.nbytes


def test_small_values_stay_inline(store):
    ref = store.put(np.arange(10))
    assert isinstance(ref, InlineObject)
    assert ref.nbytes < INLINE_THRESHOLD
    np.testing.assert_array_equal(store.get(ref), np.arange(10))
    assert store.stats()["num_objects"] == 0
    assert store.stats()["reserved_bytes"] == 0


def test_delete_frees_memory_for_reuse(store):
    first = store.put(np.zeros(100 * MiB // 8))
    used = store.stats()["used_bytes"]
    assert used >= 100 * MiB
    store.delete(first)
    assert store.stats()["used_bytes"] == 0
    second = store.put(np.ones(100 * MiB // 8))
    assert second.offset == first.offset
    assert store.stats()["reserved_bytes"] == used


def test_live_view_keeps_object_until_it_dies(store):
    ref = store.put(np.arange(MiB, dtype=np.int64))
    view = store.get(ref)
    store.delete(ref)
    assert store.stats()["num_objects"] == 1
    assert int(view[-1]) == MiB - 1
    del view
    assert store.stats()["num_objects"] == 0


def test_locate_by_id(store):
    ref = store.put(np.arange(MiB, dtype=np.int32))
    found = store.locate(ref.object_id)
    assert found == ref
    store.delete(ref)
    assert store.stats()["num_objects"] == 1
    store.delete(found)
    assert store.stats()["num_objects"] == 0
    with pytest.raises(ObjectLostError, match=str(ref.object_id)):
        store.locate(ref.object_id)


def test_value_larger_than_capacity_names_both_sizes():
    with OwnerStore(capacity=16 * MiB) as small:
        with pytest.raises(ObjectStoreFullError) as info:
            small.put(np.zeros(4 * MiB))  # 32 MiB
        message = str(info.value)
        assert f"{32 * MiB:,} bytes" in message
        assert f"capacity is {16 * MiB:,} bytes" in message
        assert small.stats()["num_objects"] == 0


def test_full_store_waits_then_raises_and_recovers():
    with OwnerStore(capacity=16 * MiB, wait_s=0.3, spill_threshold=1.0) as small:
        refs = [small.put(np.zeros(MiB)) for _ in range(2)]  # 8 MiB each
        views = [small.get(ref) for ref in refs]  # viewed: they cannot be spilled
        started = time.monotonic()
        with pytest.raises(ObjectStoreFullError, match=r"after waiting 0\.3 s") as info:
            small.put(np.zeros(MiB))
        assert time.monotonic() - started >= 0.3
        message = str(info.value)
        for words in (f"{8 * MiB:,} bytes", f"capacity {16 * MiB:,}", "spilled 0 bytes",
                      f"object {refs[0].object_id} ({8 * MiB:,} bytes, in memory, held by "
                      "the owner"):
            assert words in message, message
        del views
        small.delete(refs[0])
        again = small.put(np.zeros(MiB))
        assert again.offset == refs[0].offset


def test_store_leaves_no_name_in_dev_shm():
    before = set(os.listdir("/dev/shm"))
    with OwnerStore(capacity=64 * MiB) as owner:
        owner.put(np.zeros(MiB))
        assert set(os.listdir("/dev/shm")) == before
    assert set(os.listdir("/dev/shm")) == before


CHILD_READER = """
import sys
import numpy as np
from sharedcompute._store import ClientStore
store = ClientStore(sys.argv[1])
ref = store.locate(int(sys.argv[2]))
value = store.get(ref)
print(value.dtype, value.shape, value.flags.writeable, float(value.sum()))
"""


def test_another_process_reads_by_id(store):
    array = np.arange(10 * MiB // 8, dtype=np.float64)
    ref = store.put(array)
    out = run_python(CHILD_READER, store.address, str(ref.object_id))
    assert out == f"float64 ({array.size},) False {float(array.sum())}"


def test_another_process_puts_and_owner_reads(store):
    code = """
    import sys
    import numpy as np
    from sharedcompute._store import ClientStore
    store = ClientStore(sys.argv[1])
    ref = store.put(np.full(MiB := 1 << 20, 7, dtype=np.int16))
    print(ref.object_id)
    sys.stdout.flush()
    sys.stdin.readline()
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), store.address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        object_id = int(proc.stdout.readline())
        ref = store.locate(object_id)
        value = store.get(ref)
        assert value.dtype == np.int16 and value.size == 1 << 20 and int(value.sum()) == 7 << 20
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=TIMEOUT) == 0
        # The child's reference died with it; ours (locate + view) remain.
        assert store.stats()["num_objects"] == 1
        store.delete(ref)
        del value
        assert store.stats()["num_objects"] == 0
    finally:
        proc.kill()
        proc.wait(timeout=TIMEOUT)


def test_sigkilled_client_releases_its_references(store):
    ref = store.put(np.zeros(MiB))
    code = """
    import os, signal, sys
    from sharedcompute._store import ClientStore
    store = ClientStore(sys.argv[1])
    view = store.get(store.locate(int(sys.argv[2])))
    os.kill(os.getpid(), signal.SIGKILL)
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), store.address, str(ref.object_id)],
        timeout=TIMEOUT,
    )
    assert proc.returncode == -signal.SIGKILL
    store.delete(ref)
    deadline = time.monotonic() + TIMEOUT
    while store.stats()["num_objects"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.stats()["num_objects"] == 0


OWNER_PROCESS = """
import sys, time
import numpy as np
from sharedcompute._store import OwnerStore
store = OwnerStore(capacity=1 << 30)
ref = store.put(np.ones(256 * (1 << 20) // 8))
print(store.address, ref.object_id, flush=True)
time.sleep(600)
"""

HOLDING_CLIENT = """
import sys, time
from sharedcompute._store import ClientStore
store = ClientStore(sys.argv[1])
view = store.get(store.locate(int(sys.argv[2])))
print("holding", flush=True)
sys.stdin.readline()
print(float(view.sum()), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("first_killed", ["owner", "client"])
def test_sigkill_of_any_process_leaves_no_shared_memory(first_killed):
    shm_before = set(os.listdir("/dev/shm"))
    shmem_before = shmem_kib()
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER_PROCESS], stdout=subprocess.PIPE, text=True
    )
    client = None
    try:
        address, object_id = owner.stdout.readline().split()
        client = subprocess.Popen(
            [sys.executable, "-c", HOLDING_CLIENT, address, object_id],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout.readline().strip() == "holding"
        assert shmem_kib() - shmem_before > 200 * 1024
        assert set(os.listdir("/dev/shm")) == shm_before
        if first_killed == "owner":
            owner.kill()
            owner.wait(timeout=TIMEOUT)
            # The survivor's view is still valid memory.
            client.stdin.write("\n")
            client.stdin.flush()
            assert float(client.stdout.readline()) == 256 * (1 << 20) / 8
            client.kill()
        else:
            client.kill()
            client.wait(timeout=TIMEOUT)
            owner.kill()
        owner.wait(timeout=TIMEOUT)
        client.wait(timeout=TIMEOUT)
    finally:
        for proc in (owner, client):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=TIMEOUT)
    assert set(os.listdir("/dev/shm")) == shm_before
    deadline = time.monotonic() + 10
    while shmem_kib() - shmem_before > 64 * 1024 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert shmem_kib() - shmem_before < 64 * 1024


def test_owner_exception_exit_releases_memory():
    shmem_before = shmem_kib()
    code = """
    import numpy as np
    from sharedcompute._store import OwnerStore
    store = OwnerStore(capacity=1 << 30)
    store.put(np.ones(256 * (1 << 20) // 8))
    raise RuntimeError("boom")
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 1 and "boom" in proc.stderr
    assert shmem_kib() - shmem_before < 64 * 1024


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount_point = tmp_path / "shm"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount_point)],
        capture_output=True,
    )
    if result.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield str(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True, timeout=TIMEOUT)


def test_full_shm_filesystem_raises_instead_of_sigbus(tiny_tmpfs):
    with pytest.warns(ResourceWarning, match="exceeds the free space"):
        owner = OwnerStore(capacity=256 * MiB, directory=tiny_tmpfs)
    with owner:
        kept = owner.put(np.ones(16 * MiB // 8))
        with pytest.raises(ObjectStoreFullError, match="filesystem is full"):
            owner.put(np.ones(64 * MiB // 8))
        # The store is still usable after the failure.
        np.testing.assert_array_equal(owner.get(kept), np.ones(16 * MiB // 8))
        assert owner.stats()["num_objects"] == 1
        owner.delete(kept)  # nothing left in the mapping: close() unmaps it


def test_client_full_shm_raises_in_client(tiny_tmpfs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        owner = OwnerStore(capacity=256 * MiB, directory=tiny_tmpfs)
    with owner:
        code = """
        import sys
        import numpy as np
        from sharedcompute._store import ClientStore
        from sharedcompute.errors import ObjectStoreFullError
        store = ClientStore(sys.argv[1])
        try:
            store.put(np.ones(64 * (1 << 20) // 8))
        except ObjectStoreFullError as exc:
            print("full:", exc)
        """
        assert run_python(code, owner.address).startswith("full:")


def test_concurrent_threads_put_and_get(store):
    import threading

    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(20):
                array = np.full(MiB // 8, seed * 100 + i, dtype=np.int64)
                ref = store.put(array)
                assert int(store.get(ref)[0]) == seed * 100 + i
                store.delete(ref)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=TIMEOUT)
    assert not errors
    assert store.stats()["num_objects"] == 0


def test_client_rejects_unknown_address():
    from sharedcompute.errors import SharedComputeError

    with pytest.raises(SharedComputeError, match="cannot connect"):
        ClientStore("sharedcompute-no-such-store")


def test_a_failed_decref_gets_no_reply_so_the_client_stays_in_step(store):
    # The client sends decref without waiting for an answer; an "err" reply would be read
    # as the answer to its next request.
    import pickle

    client = ClientStore(store.address)
    try:
        client._sock.send(pickle.dumps(("decref", "not a mapping"), protocol=5))
        stats = client.stats()
        assert isinstance(stats, dict) and stats["num_objects"] == 0
    finally:
        client.close()


def test_releasing_very_many_objects_at_once_reaches_the_owner(store):
    # One datagram for every release would exceed the socket's limit (EMSGSIZE), and the
    # releases were dropped silently: the real objects below stayed held.
    import collections

    client = ClientStore(store.address)
    try:
        refs = [client.put(np.full(INLINE_THRESHOLD, i, dtype=np.uint8)) for i in range(3)]
        assert store.stats()["num_objects"] == 3
        released = collections.Counter({ref.object_id: 1 for ref in refs})
        released.update({10**9 + i: 1 for i in range(300_000)})  # ids it never held
        with client._lock:
            client._decref(released)
        deadline = time.monotonic() + TIMEOUT
        while store.stats()["num_objects"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.stats()["num_objects"] == 0
    finally:
        client.close()


def test_reserved_ranges_merge_and_name_what_is_missing():
    from sharedcompute._store._segment import _Spans

    spans = _Spans()
    assert spans.missing(0, 100) == [(0, 100)]
    spans.add(0, 40)
    spans.add(60, 80)
    assert spans.missing(0, 100) == [(40, 60), (80, 100)]
    assert spans.missing(10, 30) == []
    assert spans.missing(30, 70) == [(40, 60)]
    spans.add(40, 60)  # fills the gap: one range
    assert spans.missing(0, 80) == [] and spans.total() == 80
    spans.add(90, 95)
    assert spans.missing(70, 100) == [(80, 90), (95, 100)]


def test_a_large_object_in_fresh_pages_is_reserved_by_its_writer():
    """Past SLICED_BYTES of unreserved pages the writer reserves them as it copies; the owner
    counts them once the object is sealed, and reserves nothing twice after that."""
    from sharedcompute._serialization._format import SLICED_BYTES

    with OwnerStore(capacity=512 * MiB) as owner:
        small = owner.put(np.ones(MiB // 8))
        reserved = owner.stats()["reserved_bytes"]
        assert MiB <= reserved < 2 * MiB
        size = 2 * SLICED_BYTES + 3 * 4096 + 8
        big = owner.put(np.arange(size // 8, dtype=np.int64))
        assert owner.stats()["reserved_bytes"] >= reserved + size
        value = owner.get(big)
        assert value[-1] == size // 8 - 1 and int(value[::4097].sum()) == int(
            np.arange(size // 8, dtype=np.int64)[::4097].sum())
        del value
        owner.delete(big)
        again = owner.put(np.zeros(size // 8, dtype=np.int64))  # warm now: the owner's pages
        assert again.offset == big.offset
        assert owner._writers == {}
        owner.delete(again)
        owner.delete(small)


def test_a_client_reserves_the_fresh_pages_it_writes(store):
    code = """
    import pickle
    import sys
    import numpy as np
    from sharedcompute._serialization import serialize
    from sharedcompute._store import ClientStore, ref_to_wire
    store = ClientStore(sys.argv[1])
    value = serialize(np.arange(20 * (1 << 20), dtype=np.int64))  # 160 MiB, fresh pages
    ref = store.put_serialized(value, for_owner=True)  # as a worker hands a result over
    print(pickle.dumps(ref_to_wire(ref)).hex())
    """
    from sharedcompute._store import ref_from_wire

    ref = ref_from_wire(pickle.loads(bytes.fromhex(run_python(code, store.address))))
    store.adopt(ref)
    assert store.stats()["reserved_bytes"] >= ref.nbytes
    value = store.get(ref)
    assert value[0] == 0 and value[-1] == 20 * MiB - 1 and value[12345678] == 12345678
    del value
    store.delete(ref)
    assert store.stats()["num_objects"] == 0


def test_a_handed_over_object_is_sealed_by_whichever_comes_first(store):
    """A client's object for the owner is sealed by its one-way ``deliver`` or by the owner's
    ``adopt``, in either order; the client's own read right after its delivery is in order."""
    from sharedcompute._serialization import serialize

    client = ClientStore(store.address)
    try:
        # adopt first: the owner seals it from the reference; the late deliver changes nothing
        value = serialize(np.arange(MiB, dtype=np.int64))
        object_id, offset, _ = client._create(value.nbytes, for_owner=True)
        value.write_into(client.segment.writable(offset, value.nbytes))
        early = StoredObject(object_id, offset, value.nbytes, value.header)
        store.adopt(early)
        assert store.get(early)[-1] == MiB - 1
        client._deliver(object_id, offset, value.nbytes, value.header)
        client.release_spares()  # the block it leased ahead for a next result
        assert client.stats()["num_objects"] == 1  # the same connection: after the deliver
        # deliver first, then the client reads it at once, then the owner adopts it
        late = client.put_serialized(serialize(np.ones(MiB)), for_owner=True)
        assert float(client.get(late).sum()) == MiB
        store.adopt(late)
        assert float(store.get(late).sum()) == MiB
        store.delete(early)
        store.delete(late)
        client.release_spares()
        assert client.stats()["num_objects"] == 0
    finally:
        client.close()


def test_a_sealed_lease_hands_the_clients_hold_over_with_it(store):
    """A worker that seals a result it made in a leased block, and lets go of it next, gives
    its hold to the owner in the same one-way message; a block it also reads keeps it."""
    from sharedcompute._serialization import serialize

    client = ClientStore(store.address)
    try:
        refs = []
        for hand_over in (True, False):
            value = serialize(np.full(MiB, 3.0))
            object_id, offset = client.lease(value.nbytes)
            value.write_into(client.segment.writable(offset, value.nbytes))
            view = None if hand_over else client.get(StoredObject(
                object_id, offset, value.nbytes, value.header))  # read here as well
            ref, handed = client.seal_leased(object_id, offset, value.header, value.nbytes)
            assert handed is hand_over
            assert (object_id in client._local) is not hand_over
            store.adopt(ref)
            refs.append(ref)
            client.release_spares()
            client.stats()  # the same connection: the owner has read the deliver
            holders = {entry[0]: entry[3] for entry in store.objects()}[object_id]
            assert len(holders) == (1 if hand_over else 2), holders
            del view
        client.delete(refs[1])  # the lease's hold (the view's went with the view)
        assert float(store.get(refs[0]).sum()) == 3.0 * MiB
        for ref in refs:
            store.delete(ref)
        assert client.stats()["num_objects"] == 0 and store.stats()["used_bytes"] == 0
    finally:
        client.close()


def test_a_client_leases_its_next_results_block_ahead(store):
    """After a result for the owner, the client has the next block of that size leased ahead:
    the next result of about that size takes it without a round trip; idle, it goes back."""
    from sharedcompute._serialization import serialize

    client = ClientStore(store.address)
    try:
        first = client.put_serialized(serialize(np.ones(MiB)), for_owner=True)
        store.adopt(first)
        stats = client.stats()
        assert (stats["num_objects"], stats["unsealed_objects"]) == (1, 1)  # and one ahead
        ahead = client._spares[0][:2]
        second = client.put_serialized(serialize(np.full(MiB, 2.0)), for_owner=True)
        assert (second.object_id, second.offset) == ahead
        store.adopt(second)
        assert float(store.get(second).sum()) == 2.0 * MiB
        # A value of another size gives the kept block back and takes one of its own.
        third = client.put_serialized(serialize(np.ones(MiB // 4)), for_owner=True)
        store.adopt(third)
        client.release_spares()
        stats = client.stats()
        assert (stats["num_objects"], stats["unsealed_objects"]) == (3, 0)
        for ref in (first, second, third):
            store.delete(ref)
        assert client.stats()["num_objects"] == 0 and store.stats()["used_bytes"] == 0
    finally:
        client.close()


def test_an_incoming_object_in_fresh_pages_is_reserved_before_it_arrives():
    from sharedcompute._serialization import serialize

    with OwnerStore(capacity=256 * MiB) as owner:
        value = serialize(np.arange(8 * MiB, dtype=np.int64))  # 64 MiB: past the writer's share
        object_id, memory = owner.allocate_incoming(value.nbytes)
        assert owner.stats()["reserved_bytes"] >= value.nbytes  # the bytes arrive in any order
        value.write_into(memory)
        del memory
        ref = owner.seal_incoming(object_id, value.header)
        assert owner.get(ref)[-1] == 8 * MiB - 1
        owner.delete(ref)
