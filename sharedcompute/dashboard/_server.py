"""The dashboard's web server: an aiohttp application in a thread of its own.

::

    Dashboard(runtime)                 thread "sharedcompute-dashboard"
      │ start: wait until bound   ──►  asyncio loop ─ aiohttp AppRunner / TCPSite
      │                                  ├─ HTTP handlers (page, /api/..., /metrics)
      │                                  └─ the pusher: every PUSH_INTERVAL, one tick
      │                                       (DashboardState: snapshot + new stream
      │                                        records + new errors) → one JSON text
      │                                       → every open WebSocket
      └ close(): stop event ──────────►  sockets closed, runner cleaned up, loop closed

Everything that touches :class:`DashboardState` runs on the loop's thread, so the
state needs no lock of its own; the runtime's own state is read under its lock
(see ``_state``). The pusher ticks whether or not a page is open, so the
cumulative counts (by function, the durations histogram) see every record
before the timeline's ring forgets it; it ticks less often when a tick is costly
(at most a tenth of the thread's time), and a page that does not read its
WebSocket within ``SEND_TIMEOUT`` is dropped rather than stall the others.

Endpoints:

- ``GET /``: the page (``static/index.html``); ``GET /static/<file>``: its JS and CSS.
- ``GET /api/snapshot``: the latest snapshot (see ``DashboardState.snapshot``): counts
  by state, totals, functions, workers (CPU, RSS, their tasks), nodes, store, actors.
- ``GET /api/tasks?offset=0&limit=100[&name=f][&ok=true|false]``: a page of the task
  executions the timeline keeps, newest first, with ``total`` (``limit`` <= 1000).
- ``GET /api/stream?since=SEQ[&limit=N]``: task-stream records from sequence number
  ``SEQ`` on (``[seq, key, name, worker, node, start, duration, ok]``) and ``next``.
- ``GET /api/errors[?since=SEQ]``: recent errors: key, name, type, message, traceback.
- ``GET /api/ws`` (WebSocket): first ``{"type": "hello", snapshot, stream, errors}``
  (the last records and every kept error), then every ``PUSH_INTERVAL`` seconds
  ``{"type": "update", snapshot, stream, errors}`` with only what is new.
- ``GET /metrics``: Prometheus text (``_metrics``).
- ``GET|POST /login``: the token form, where the dashboard asks for one.

Access: bound to loopback it is open to this machine's users, as Ray's is. Bound
anywhere else it needs the cluster token: ``POST /login`` checks it
(``hmac.compare_digest``) and sets an HttpOnly, SameSite=Strict session cookie (a
random value of this dashboard's, never the token); ``Authorization: Bearer TOKEN``
works too (for Prometheus). Without either, ``/api/...`` and ``/metrics`` answer 401
JSON and pages redirect to ``/login``. A WebSocket whose ``Origin`` is another site
is refused, so a web page elsewhere cannot read a loopback dashboard.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from sharedcompute.dashboard._metrics import CONTENT_TYPE, Metrics
from sharedcompute.dashboard._state import STREAM_BACKLOG, DashboardState

if TYPE_CHECKING:
    from sharedcompute._cluster._messages import WorkerProcess
    from sharedcompute._runtime._driver import Runtime

PUSH_INTERVAL = 0.5
SEND_TIMEOUT = 5.0
START_TIMEOUT = 30.0
COOKIE = "sharedcompute_dashboard"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_PAGE = 1000
_STATIC_TYPES = {".html": "text/html", ".js": "application/javascript", ".css": "text/css"}

_STATIC = resources.files("sharedcompute.dashboard").joinpath("static")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Dashboard:
    """A live web dashboard of ``runtime``, served until :meth:`close`.

    ``port=None`` takes a free port; ``token`` (the cluster's) is required when
    ``host`` is not a loopback name or address. ``nodes``, where given, lists every
    node (a head passes its ``Head.status()`` as dicts); else the runtime's own.
    ``worker_processes``, where given, has the pid, CPU and memory of workers on other
    nodes (a head passes ``Head.worker_processes``); else only this process's are shown.
    """

    def __init__(
        self,
        runtime: Runtime,
        host: str = "127.0.0.1",
        port: int | None = None,
        token: str | None = None,
        *,
        nodes: Callable[[], list[dict[str, Any]]] | None = None,
        worker_processes: Callable[[], dict[int, WorkerProcess]] | None = None,
        push_interval: float = PUSH_INTERVAL,
    ) -> None:
        self.host = host
        self.needs_login = host not in LOOPBACK
        if self.needs_login and not token:
            raise ValueError(
                f"a dashboard bound to {host!r} (not loopback) needs the cluster token"
            )
        self._token = token.encode() if token else b""
        self._session = secrets.token_urlsafe(32)
        self._push_interval = push_interval
        self.state = DashboardState(runtime, nodes, worker_processes)
        self._latest: dict[str, Any] = {}
        self._metrics = Metrics(self.state, lambda: self._latest)
        self._error_cursor = 0
        self._sockets: set[web.WebSocketResponse] = set()
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()  # (bound to the loop that first waits on it)
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self.port = 0
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, args=(port or 0,), name="sharedcompute-dashboard", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            self.close()
            raise TimeoutError(f"the dashboard did not start within {START_TIMEOUT} s")
        if self._failure is not None:
            self._thread.join(START_TIMEOUT)
            raise self._failure

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    def close(self) -> None:
        """Stop serving: the WebSockets, the listening socket, the thread and its loop."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(RuntimeError):  # the loop already ended
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_TIMEOUT)

    def __enter__(self) -> Dashboard:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the thread --------------------------------------------------------------------

    def _run(self, port: int) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve(port))
        except BaseException as error:
            self._failure = error
        finally:
            self._ready.set()
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    async def _serve(self, port: int) -> None:
        runner = web.AppRunner(self._app(), access_log=None, handle_signals=False,
                               shutdown_timeout=1.0)
        await runner.setup()
        pusher: asyncio.Task[None] | None = None
        try:
            site = web.TCPSite(runner, self.host, port)
            await site.start()
            self.port = int(runner.addresses[0][1])
            self._tick()  # a first snapshot before anyone asks
            pusher = asyncio.ensure_future(self._push_forever())
            self._ready.set()
            await self._stop.wait()
        finally:
            if pusher is not None:
                pusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pusher
            for ws in list(self._sockets):
                with contextlib.suppress(Exception):
                    await ws.close()
            await runner.cleanup()

    # -- pushing -----------------------------------------------------------------------

    def _tick(self) -> tuple[list[Any], list[dict[str, Any]]]:
        stream = self.state.advance()
        errors = self.state.errors(self._error_cursor)
        if errors:
            self._error_cursor = errors[-1]["seq"] + 1
        self._latest = self.state.snapshot()
        return stream, errors

    async def _push_forever(self) -> None:
        cost = 0.0
        while True:
            # At most a tenth of this thread's time goes to ticks (a tick counts the tasks
            # the scheduler holds: ~20 ms with 100,000 Futures alive).
            await asyncio.sleep(max(self._push_interval, 10 * cost))
            started = time.perf_counter()
            try:
                stream, errors = self._tick()
            except Exception:  # a runtime closing under us: the next tick tries again
                continue
            finally:
                cost = time.perf_counter() - started
            if not self._sockets:
                continue
            text = json.dumps({"type": "update", "snapshot": self._latest,
                               "stream": stream, "errors": errors})
            for ws in list(self._sockets):
                try:
                    # A page that stops reading loses its place rather than stall the others.
                    await asyncio.wait_for(ws.send_str(text), SEND_TIMEOUT)
                except (ConnectionError, RuntimeError, asyncio.TimeoutError):
                    self._sockets.discard(ws)
                    await ws.close()

    # -- the application ---------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/login", self._login_form)
        app.router.add_post("/login", self._login)
        app.router.add_get("/api/snapshot", self._snapshot)
        app.router.add_get("/api/tasks", self._tasks)
        app.router.add_get("/api/stream", self._stream)
        app.router.add_get("/api/errors", self._errors)
        app.router.add_get("/api/ws", self._websocket)
        app.router.add_get("/metrics", self._metrics_text)
        return app

    def _authorized(self, request: web.Request) -> bool:
        if not self.needs_login:
            return True
        cookie = request.cookies.get(COOKIE, "")
        if cookie and hmac.compare_digest(cookie.encode(), self._session.encode()):
            return True
        bearer = request.headers.get("Authorization", "")
        return bearer.startswith("Bearer ") and hmac.compare_digest(
            bearer[7:].strip().encode(), self._token
        )

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/login" or self._authorized(request):
            return await handler(request)
        if request.path.startswith("/api/") or request.path == "/metrics":
            return web.json_response({"error": "log in at /login with the cluster token"},
                                     status=401)
        raise web.HTTPFound("/login")

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return _static_file("index.html")

    async def _static(self, request: web.Request) -> web.StreamResponse:
        return _static_file(request.match_info["name"])

    async def _login_form(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=_LOGIN_PAGE.format(message=""), content_type="text/html")

    async def _login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        given = str(form.get("token", "")).encode()
        if self.needs_login and not hmac.compare_digest(given, self._token):
            message = '<p class="error">That is not the cluster token.</p>'
            return web.Response(text=_LOGIN_PAGE.format(message=message),
                                content_type="text/html", status=401)
        response = web.HTTPFound("/")
        response.set_cookie(COOKIE, self._session, httponly=True, samesite="Strict", path="/")
        raise response

    async def _snapshot(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._latest)

    async def _tasks(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        offset = _int(query.get("offset"), 0, 0, 1 << 40)
        limit = _int(query.get("limit"), 100, 1, MAX_PAGE)
        ok_text = query.get("ok")
        ok = None if ok_text is None else ok_text.lower() in ("1", "true", "yes")
        page = self.state.task_page(offset, limit, query.get("name"), ok)
        return web.json_response(page)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        since = _int(request.query.get("since"), 0, 0, 1 << 62)
        limit = _int(request.query.get("limit"), STREAM_BACKLOG, 1, STREAM_BACKLOG)
        records = self.state.stream_since(since, limit)
        following = records[-1][0] + 1 if records else since
        return web.json_response({"stream": records, "next": following})

    async def _errors(self, request: web.Request) -> web.StreamResponse:
        since = _int(request.query.get("since"), 0, 0, 1 << 62)
        return web.json_response({"errors": self.state.errors(since)})

    async def _metrics_text(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin and urlsplit(origin).netloc != request.host:
            return web.json_response({"error": "cross-origin WebSocket refused"}, status=403)
        ws = web.WebSocketResponse(heartbeat=30.0)
        await ws.prepare(request)
        await ws.send_str(json.dumps({
            "type": "hello", "snapshot": self._latest, "stream": self.state.backlog(),
            "errors": self.state.errors(0),
        }))
        self._sockets.add(ws)
        try:
            async for message in ws:  # nothing to read: this waits for the close
                if message.type == WSMsgType.ERROR:
                    break
        finally:
            self._sockets.discard(ws)
        return ws


def _static_file(name: str) -> web.StreamResponse:
    suffix = name[name.rfind("."):] if "." in name else ""
    if "/" in name or name.startswith(".") or suffix not in _STATIC_TYPES:
        raise web.HTTPNotFound()
    try:
        body = _STATIC.joinpath(name).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise web.HTTPNotFound() from None
    return web.Response(body=body, content_type=_STATIC_TYPES[suffix],
                        headers={"Cache-Control": "no-cache"})


def _int(text: str | None, default: int, low: int, high: int) -> int:
    try:
        value = int(text) if text is not None else default
    except ValueError:
        raise web.HTTPBadRequest(text=f"not an integer: {html.escape(text or '')}") from None
    return max(low, min(high, value))


_LOGIN_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sharedcompute dashboard: log in</title>
<style>
body {{ font: 15px system-ui, sans-serif; margin: 4em auto; max-width: 28em; }}
input {{ font: inherit; padding: .3em; width: 100%; box-sizing: border-box; }}
.error {{ color: #b00020; }}
</style></head><body>
<h1>sharedcompute</h1>
<p>This dashboard is reachable from the network: give the cluster token
(<code>SHAREDCOMPUTE_TOKEN</code>, or the file <code>~/.sharedcompute/token</code> on the
head).</p>
{message}
<form method="post" action="/login">
<p><input type="password" name="token" autofocus placeholder="cluster token"></p>
<p><button type="submit">Log in</button></p>
</form></body></html>
"""
