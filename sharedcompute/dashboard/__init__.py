"""A live web dashboard of a runtime (an optional extra: ``pip install sharedcompute[dashboard]``).

::

    from sharedcompute.dashboard import Dashboard
    dashboard = Dashboard(runtime)        # serves at once, in a thread of its own
    print(dashboard.url)                  # http://127.0.0.1:PORT/
    dashboard.close()

Layering: ``_state`` reads the runtime (scheduler counts, workers, store, actors,
the timeline's task records and errors) and keeps the few cumulative counts;
``_metrics`` turns that into Prometheus text; ``_server`` serves both, the page
and its WebSocket with aiohttp, and owns the thread. ``static/`` is the page:
plain HTML, CSS and JS, no build step. The endpoints are listed in ``_server``.
The dashboard sits at the top of the layers (beside ``_api``): it reads the
runtime; nothing below imports it.
"""

from __future__ import annotations

try:
    from sharedcompute.dashboard._server import Dashboard
except ImportError as error:  # aiohttp or prometheus_client missing
    raise ImportError(
        f"the dashboard needs the 'dashboard' extra: pip install 'sharedcompute[dashboard]' "
        f"({error})"
    ) from error

__all__ = ["Dashboard"]
