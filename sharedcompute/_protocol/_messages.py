"""The messages exchanged between the driver and its worker processes.

A message is a tuple whose first item is a :class:`Msg`. Bulk data never rides
in a message: values above the inline threshold travel as store descriptors.

Driver -> worker
    RUN       (key, fn_key, fn_bytes | None, args_ref, dep_refs, name, parent_key, stream,
               granted)                    granted: the store holds its stored inputs for it
    RESOLVED  (key, ok, ref_or_error)      answer to a WAIT
    SHUTDOWN  ()
    CREATE    (actor_id, cls_key, cls_bytes, args_ref, dep_refs, max_concurrency, description)
    CALL      (key, method, args_ref, dep_refs, name)
    FORGET    (fn_keys,)                   drop these functions (the driver's bound per worker)
    DROP      (key,)                       drop this task unrun if still queued; answer RETURN
    INIT      (initializer_bytes,)         first message, when the runtime has an initializer
Worker -> driver
    READY     (pid, store_client)           store_client: its id at the object store
    DONE      (key, ref)
    FAILED    (key, error_bytes)           pickled (exception, traceback text)
    SUBMIT    (key, fn_key, fn_bytes, args_ref, dep_keys, options, parent_key)  (always with bytes)
    RETURN    (key,)                       a blocked worker hands back a task it never started
    PUT       (key, ref)
    WAIT      (keys,)                      send me RESOLVED for these keys
    BLOCKED   (key,) / UNBLOCKED (key,)    task ``key`` waits on a future / resumes
    RELEASE   (keys,)                      this worker dropped its Futures for keys
    CANCEL    (key,)
    SUBMIT_CALL (key, actor_id, class_name, method, args_ref, dep_keys)
    CREATE_FAILED (actor_id, error_bytes)      the actor's constructor raised
    INIT_FAILED (error_bytes,)             the initializer raised; the worker exits
    ACTOR_LEASE / ACTOR_RETAIN / ACTOR_RELEASE (actor_id,)
                                           a handle was pickled / unpickled here / dropped here
Driver connected to a head -> head (it speaks as a worker, plus these)
    CREATE_ACTOR (reply_key, actor_id, cls_key, cls_bytes, args_ref, dep_keys, options,
                  class_name, methods)     answered with RESOLVED (reply_key, ok, None | error)
    KILL_ACTOR  (actor_id, no_restart)
    GET_ACTOR   (reply_key, name)          answered with RESOLVED (reply_key, ok, ref | error):
                                           the ref's value is (actor_id, class_name, methods)
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any


class Msg(enum.IntEnum):
    RUN = 1
    RESOLVED = 2
    SHUTDOWN = 3
    CREATE = 4
    CALL = 5
    FORGET = 6
    DROP = 7
    INIT = 8
    READY = 10
    DONE = 11
    FAILED = 12
    SUBMIT = 13
    PUT = 14
    WAIT = 15
    BLOCKED = 16
    UNBLOCKED = 17
    RELEASE = 18
    CANCEL = 19
    CREATE_FAILED = 20
    ACTOR_RETAIN = 21
    ACTOR_RELEASE = 22
    ACTOR_LEASE = 23
    SUBMIT_CALL = 24
    RETURN = 25
    INIT_FAILED = 26
    CREATE_ACTOR = 27
    KILL_ACTOR = 28
    GET_ACTOR = 29
    YIELD = 30  # worker -> driver: a generator task's item (key, index, ref)
    STREAM_ACK = 31  # driver -> worker: items of a stream taken so far (key, count)
    STREAM_STOP = 32  # driver -> worker: nobody reads this stream: stop its generator
    # head -> the client that submitted a generator task: an item (key, index, item key, ref)
    STREAM_ITEM = 33


# Where messages carry object references (as ``ref_to_wire`` tuples), for the code that
# rewrites them on their way between nodes: single references, by position ...
_REF_AT: dict[int, int] = {
    Msg.RUN: 4, Msg.CALL: 3, Msg.CREATE: 4, Msg.DONE: 2, Msg.SUBMIT: 4, Msg.PUT: 2,
    Msg.SUBMIT_CALL: 5, Msg.CREATE_ACTOR: 5, Msg.YIELD: 3, Msg.STREAM_ITEM: 4,
}
# ... and tuples of (key, reference or None) pairs.
_DEPS_AT: dict[int, int] = {Msg.RUN: 5, Msg.CALL: 4, Msg.CREATE: 5}


def map_refs(
    message: tuple[Any, ...], convert: Callable[[tuple[Any, ...]], tuple[Any, ...]]
) -> tuple[Any, ...]:
    """``message`` with every object reference in it passed through ``convert``."""
    kind = message[0]
    if kind == Msg.RESOLVED:
        return message if not message[2] else (*message[:3], convert(message[3]))
    at = _REF_AT.get(kind)
    if at is None:
        return message
    items = list(message)
    items[at] = convert(items[at])
    deps_at = _DEPS_AT.get(kind)
    if deps_at is not None:
        items[deps_at] = tuple(
            (key, None if ref is None else convert(ref)) for key, ref in items[deps_at]
        )
    return tuple(items)


def refs_of(message: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Every object reference ``message`` carries."""
    found: list[tuple[Any, ...]] = []

    def note(ref: tuple[Any, ...]) -> tuple[Any, ...]:
        found.append(ref)
        return ref

    map_refs(message, note)
    return found
