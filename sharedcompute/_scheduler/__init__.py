"""The scheduler (private): a pure state machine, events in, instructions out."""

from sharedcompute._scheduler._core import SchedulerCore
from sharedcompute._scheduler._events import *  # noqa: F403
from sharedcompute._scheduler._events import __all__ as _events_all
from sharedcompute._scheduler._nodes import PINS_PER_NODE, node_resource, public_resources

__all__ = ["PINS_PER_NODE", "SchedulerCore", "node_resource", "public_resources", *_events_all]
