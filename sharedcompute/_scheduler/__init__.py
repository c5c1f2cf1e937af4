"""The scheduler (private): a pure state machine, events in, instructions out."""

from sharedcompute._scheduler._core import SchedulerCore
from sharedcompute._scheduler._events import *  # noqa: F403
from sharedcompute._scheduler._events import __all__ as _events_all

__all__ = ["SchedulerCore", *_events_all]
