"""The web dashboard (sharedcompute.dashboard): real runtime, real HTTP and WebSocket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from _cluster import TOKEN as CLUSTER_TOKEN
from _cluster import start_node, stop_processes

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import sharedcompute as sc  # noqa: E402
from sharedcompute._runtime._timeline import Timeline  # noqa: E402
from sharedcompute.dashboard import Dashboard  # noqa: E402

T = TypeVar("T")
TIMEOUT = 15.0


def square(x: int) -> int:
    return x * x


def slow_square(x: int) -> int:
    time.sleep(1.0)
    return x * x


def explode(x: int) -> int:
    raise ValueError(f"exploded on {x}")


def submit_all(fn: Callable[[int], int], n: int) -> list[Any]:
    # One task per item (sc.map may batch tiny calls: one timeline record per batch).
    return [sc.submit(fn, i) for i in range(n)]


def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        return json.load(response)


def poll(fn: Callable[[], T | None], what: str, timeout: float = TIMEOUT) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run_async(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, TIMEOUT))


def test_json_endpoints_show_a_workload_and_its_counts_grow() -> None:
    with sc.Runtime(num_workers=2) as rt, Dashboard(rt, push_interval=0.1) as dashboard:
        assert dashboard.url == f"http://127.0.0.1:{dashboard.port}/"
        first = submit_all(square, 40)
        sc.wait(first, timeout=TIMEOUT)

        def finished(at_least: int) -> dict[str, Any] | None:
            snap = get_json(dashboard.url + "api/snapshot")
            return snap if snap["totals"]["finished"] >= at_least else None

        snap = poll(lambda: finished(40), "40 finished tasks in the snapshot")
        functions = {f["name"]: f for f in snap["functions"]}
        assert functions["square"]["finished"] == 40
        assert snap["counts"]["finished"] == 40  # the Futures are still held
        assert len(snap["workers"]) == 2
        assert all(w["pid"] and w["rss"] for w in snap["workers"])
        assert snap["nodes"][0]["alive"] and snap["store"]["capacity"] > 0

        page = get_json(dashboard.url + "api/tasks?limit=10")
        assert page["total"] == 40 and len(page["tasks"]) == 10
        assert {t["name"] for t in page["tasks"]} == {"square"}

        slow = sc.submit(slow_square, 3)
        running = poll(
            lambda: [w for w in get_json(dashboard.url + "api/snapshot")["workers"]
                     if any(t["name"] == "slow_square" for t in w["tasks"])],
            "the slow task on a worker's row",
        )
        assert running[0]["assigned"] == 1
        more = submit_all(square, 60)
        sc.wait(more, timeout=TIMEOUT)
        assert slow.result(timeout=TIMEOUT) == 9
        snap = poll(lambda: finished(101), "the counts to grow to 101")
        assert {f["name"]: f["finished"] for f in snap["functions"]}["square"] == 100


def test_the_websocket_pushes_snapshots_and_new_stream_records() -> None:
    async def scenario(url: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with aiohttp.ClientSession() as session, session.ws_connect(url + "api/ws") as ws:
            hello = await ws.receive_json(timeout=TIMEOUT)
            assert hello["type"] == "hello"
            await asyncio.to_thread(lambda: sc.wait(submit_all(square, 25), timeout=10))
            updates = []
            names: list[str] = []
            while names.count("square") < 25:
                update = await ws.receive_json(timeout=TIMEOUT)
                updates.append(update)
                names += [record[2] for record in update["stream"]]
            return hello, updates

    with sc.Runtime(num_workers=2) as rt, Dashboard(rt, push_interval=0.1) as dashboard:
        sc.wait(submit_all(square, 5), timeout=TIMEOUT)
        poll(lambda: get_json(dashboard.url + "api/snapshot")["totals"]["finished"] >= 5,
             "5 finished tasks")
        hello, updates = run_async(scenario(dashboard.url))
    assert len(hello["stream"]) == 5 and hello["snapshot"]["totals"]["finished"] >= 5
    assert all(u["type"] == "update" for u in updates)
    seqs = [r[0] for u in updates for r in u["stream"]]
    assert seqs == sorted(set(seqs)) and min(seqs) == 5  # only what is new, in order, once
    record = updates[-1]["stream"][-1]
    assert record[3] in (0, 1) and record[6] >= 0 and record[7] is True
    assert updates[-1]["snapshot"]["totals"]["finished"] >= 30


def test_a_cross_site_websocket_is_refused() -> None:
    async def scenario(url: str) -> int:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(url + "api/ws",
                                              headers={"Origin": "http://evil.example"}):
                    return 101
            except aiohttp.WSServerHandshakeError as error:
                return error.status

    with sc.Runtime(num_workers=2) as rt, Dashboard(rt) as dashboard:
        assert run_async(scenario(dashboard.url)) == 403


def test_an_error_and_its_traceback_appear() -> None:
    with sc.Runtime(num_workers=2) as rt, Dashboard(rt, push_interval=0.1) as dashboard:
        failing = sc.submit(explode, 7)
        with pytest.raises(ValueError):
            failing.result(timeout=TIMEOUT)
        errors = poll(lambda: get_json(dashboard.url + "api/errors")["errors"], "the error")
        (error,) = errors
        assert error["name"] == "explode" and error["type_name"] == "ValueError"
        assert error["message"] == "exploded on 7"
        assert "in explode" in error["traceback"] and "ValueError: exploded on 7" in (
            error["traceback"])
        snap = poll(lambda: get_json(dashboard.url + "api/snapshot")["totals"]["failed"] == 1,
                    "the failure counted")
        assert snap


def metric_samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics``, parsed: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url + "metrics", timeout=TIMEOUT) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_parse_and_count_the_tasks() -> None:
    with sc.Runtime(num_workers=2) as rt, Dashboard(rt, push_interval=0.1) as dashboard:
        futures = submit_all(square, 30)
        sc.wait(futures, timeout=TIMEOUT)
        with pytest.raises(ValueError):
            sc.submit(explode, 1).result(timeout=TIMEOUT)

        def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            samples = metric_samples(dashboard.url)
            # (the totals count at once; the gauges and histogram at the next push)
            seen = (samples[("sharedcompute_tasks_finished_total", ())],
                    samples.get(("sharedcompute_tasks", (("state", "erred"),)), 0),
                    samples[("sharedcompute_task_duration_seconds_count", ())])
            return samples if seen == (30, 1, 30) else None

        samples = poll(scrape, "30 finished tasks in /metrics")
    assert samples[("sharedcompute_tasks_failed_total", ())] == 1
    assert samples[("sharedcompute_tasks", (("state", "finished"),))] == 30
    assert samples[("sharedcompute_tasks", (("state", "erred"),))] == 1
    assert samples[("sharedcompute_function_tasks_total",
                    (("function", "square"), ("outcome", "finished")))] == 30
    assert samples[("sharedcompute_task_duration_seconds_count", ())] == 30
    assert samples[("sharedcompute_task_duration_seconds_bucket", (("le", "+Inf"),))] == 30
    assert samples[("sharedcompute_workers", ())] == 2
    assert samples[("sharedcompute_nodes", ())] == 1
    assert samples[("sharedcompute_store_capacity_bytes", ())] > 0


def test_off_loopback_it_asks_for_the_token() -> None:
    async def scenario(url: str) -> None:
        # (unsafe: aiohttp's jar otherwise ignores the cookies of an IP address; browsers don't)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            async with session.get(url + "api/snapshot") as response:
                assert response.status == 401 and "error" in await response.json()
            async with session.get(url + "metrics") as response:
                assert response.status == 401
            async with session.get(url, allow_redirects=False) as response:
                assert response.status == 302 and response.headers["Location"] == "/login"
            async with session.get(url + "login") as response:
                assert response.status == 200 and 'name="token"' in await response.text()
            async with session.post(url + "login", data={"token": "wrong"},
                                    allow_redirects=False) as response:
                assert response.status == 401
                assert "sharedcompute_dashboard" not in response.cookies
            async with session.get(url + "api/snapshot") as response:
                assert response.status == 401
            async with session.post(url + "login", data={"token": "s3cret"},
                                    allow_redirects=False) as response:
                assert response.status == 302
                cookie = response.cookies["sharedcompute_dashboard"]
                assert cookie["httponly"] and cookie.value != "s3cret"
            async with session.get(url + "api/snapshot") as response:
                assert response.status == 200 and "counts" in await response.json()
            async with session.get(url) as response:
                assert response.status == 200 and "<canvas" in await response.text()
            async with session.ws_connect(url + "api/ws") as ws:
                assert (await ws.receive_json(timeout=TIMEOUT))["type"] == "hello"
        async with aiohttp.ClientSession() as session:  # no cookie: the token as a bearer
            async with session.get(url + "metrics",
                                   headers={"Authorization": "Bearer s3cret"}) as response:
                assert response.status == 200
            async with session.get(url + "metrics",
                                   headers={"Authorization": "Bearer nope"}) as response:
                assert response.status == 401

    with sc.Runtime(num_workers=2) as rt:
        with pytest.raises(ValueError, match="token"):
            Dashboard(rt, host="0.0.0.0")
        with Dashboard(rt, host="0.0.0.0", token="s3cret") as dashboard:
            assert dashboard.url == f"http://127.0.0.1:{dashboard.port}/"
            run_async(scenario(dashboard.url))


def test_a_full_timeline_still_gives_small_pages() -> None:
    names = ("load", "transform", "store")
    with sc.Runtime(num_workers=2) as rt:
        timeline = rt.timeline
        for key in range(100_000):  # as 100,000 finished tasks leave it
            timeline.add(key, names[key % 3], key % 2, 0, 0.001, 0, key % 1000 != 0)
        assert len(timeline) == 100_000
        with Dashboard(rt) as dashboard:
            started = time.monotonic()
            with urllib.request.urlopen(dashboard.url + "api/tasks?limit=50",
                                        timeout=TIMEOUT) as response:
                body = response.read()
            page = json.loads(body)
            assert page["total"] == 100_000 and len(page["tasks"]) == 50
            assert page["tasks"][0]["seq"] == 99_999 and len(body) < 20_000
            far = get_json(dashboard.url + "api/tasks?offset=99990&limit=50")
            assert [t["seq"] for t in far["tasks"]] == list(range(9, -1, -1))
            failed = get_json(dashboard.url + "api/tasks?ok=false&limit=10")
            assert failed["total"] == 100 and all(not t["ok"] for t in failed["tasks"])
            named = get_json(dashboard.url + "api/tasks?name=store&limit=5")
            assert named["total"] == 33_333 and {t["name"] for t in named["tasks"]} == {"store"}
            tail = get_json(dashboard.url + "api/stream?since=99990")
            assert [r[0] for r in tail["stream"]] == list(range(99_990, 100_000))
            assert tail["next"] == 100_000
            snap = get_json(dashboard.url + "api/snapshot")
            assert snap["totals"]["finished"] == 99_900 and snap["totals"]["failed"] == 100
            assert len(json.dumps(snap)) < 20_000
            assert time.monotonic() - started < 5.0

            async def hello(url: str) -> int:
                async with aiohttp.ClientSession() as session, session.ws_connect(
                    url + "api/ws"
                ) as ws:
                    return len(await ws.receive_str(timeout=TIMEOUT))

            assert run_async(hello(dashboard.url)) < 1_000_000  # the backlog, not the ring


def test_totals_count_from_the_runtime_start_not_the_dashboard_start() -> None:
    with sc.Runtime(num_workers=2) as rt:
        rt.timeline = Timeline(capacity=10)  # a ring that forgets quickly
        assert sc.gather([sc.submit(square, i) for i in range(30)], timeout=TIMEOUT)[-1] == 841
        with pytest.raises(ValueError):
            sc.submit(explode, 5).result(timeout=TIMEOUT)
        with Dashboard(rt) as dashboard:  # started after the ring forgot 21 executions
            snap = get_json(dashboard.url + "api/snapshot")
            assert snap["totals"]["finished"] == 30 and snap["totals"]["failed"] == 1
            scraped = metric_samples(dashboard.url)
            assert scraped[("sharedcompute_tasks_finished_total", ())] == 30
            assert scraped[("sharedcompute_tasks_failed_total", ())] == 1


def test_timeline_since_and_errors_are_bounded() -> None:
    timeline = Timeline(capacity=10)
    assert timeline.since(0) == []
    for key in range(25):
        timeline.add(key, "f", 0, 0, 0.0, 0, True)
    assert [r[8] for r in timeline.since(0)] == list(range(15, 25))  # the ring forgot 0..14
    assert [r[8] for r in timeline.since(22)] == [22, 23, 24]
    assert [r[8] for r in timeline.since(0, limit=2)] == [23, 24]
    assert timeline.since(25) == []
    assert len(timeline.trace()["traceEvents"]) == 10 + 2  # + process and thread names
    for n in range(150):
        try:
            raise KeyError(n)
        except KeyError as error:
            timeline.add_error(n, "g", error)
    kept = timeline.errors()
    assert len(kept) == 100 and kept[0].seq == 50 and kept[-1].type_name == "KeyError"


def test_close_leaves_no_thread_and_frees_the_port() -> None:
    async def open_socket(url: str) -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(url + "api/ws") as ws:
            await ws.receive_json(timeout=TIMEOUT)
            await asyncio.to_thread(dashboard.close)  # with a page still open
            message = await ws.receive(timeout=TIMEOUT)
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)

    with sc.Runtime(num_workers=2) as rt:
        dashboard = Dashboard(rt)
        url = dashboard.url
        run_async(open_socket(url))
        dashboard.close()  # twice is fine
        assert not [t for t in threading.enumerate() if t.name == "sharedcompute-dashboard"]
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(url + "api/snapshot", timeout=TIMEOUT)
        with Dashboard(rt, port=dashboard.port) as again:  # the port is free again
            assert again.port == dashboard.port
            with pytest.raises(OSError):  # ... and taken now: the error, and no thread left
                Dashboard(rt, port=again.port)


def napping_square(x: int) -> int:
    time.sleep(0.05)
    return x * x


def _headless_chromium() -> Any:
    """A headless Chromium under Selenium, or a skip saying what is missing."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("chromium and chromedriver are not installed "
                    "(Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # (--disable-dev-shm-usage: Chromium's shared memory in /tmp, not /dev/shm, which the
    # suite's fixture watches; --no-sandbox: CI runs as root)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1500"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver_path)
    return webdriver.Chrome(options=options, service=service)


def _open_live(browser: Any, url: str) -> tuple[Any, Callable[[str], str]]:
    """Load the page and wait until its WebSocket is live: (a wait, the text of an id)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.set_page_load_timeout(TIMEOUT)
    browser.get(url)
    wait = WebDriverWait(browser, TIMEOUT, poll_frequency=0.1)

    def text(element_id: str) -> str:
        return str(browser.find_element(By.ID, element_id).text)

    wait.until(lambda _: text("connection") == "live")
    return wait, text


def test_a_browser_sees_tasks_counts_and_a_traceback(tmp_path: Any) -> None:
    """The page itself, in headless Chromium: the stream fills, counts grow, the error's
    traceback shows. SHAREDCOMPUTE_DASHBOARD_SCREENSHOT=path keeps a screenshot there."""
    import os
    import shutil

    from selenium.webdriver.common.by import By

    browser = _headless_chromium()
    try:
        with sc.Runtime(num_workers=2) as rt, Dashboard(rt) as dashboard:
            wait, text = _open_live(browser, dashboard.url)
            assert text("totals-finished") == "0"
            futures = [sc.submit(napping_square, i) for i in range(40)]
            futures.append(sc.submit(explode, 5))
            sc.wait(futures, timeout=TIMEOUT)
            wait.until(lambda _: int(text("totals-finished")) >= 40)
            canvas = browser.find_element(By.ID, "stream")
            wait.until(lambda _: int(canvas.get_attribute("data-records")) >= 41)
            assert "napping_square" in text("legend")
            assert "napping_square" in text("functions")
            wait.until(lambda _: "ValueError" in text("errors"))
            traceback = browser.find_element(By.CSS_SELECTOR, "#errors pre.traceback").text
            assert "in explode" in traceback and "exploded on 5" in traceback
            wait.until(lambda _: "napping_square" in text("tasks"))
            assert len(browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr")) == 2
            assert text("count-finished").startswith("40")
            shot = tmp_path / "dashboard.png"
            assert browser.save_screenshot(str(shot))
            keep = os.environ.get("SHAREDCOMPUTE_DASHBOARD_SCREENSHOT")
            if keep:
                shutil.copyfile(shot, keep)
    finally:
        browser.quit()


def test_a_browser_watching_10000_tasks_shows_all_of_them() -> None:
    """A 10,000-task job watched live: when it ends the page counts every task, its
    function table and its task pages hold all of them (the stream draws what its window
    keeps). tools/bench/dashboard.py measures what watching costs."""
    from selenium.webdriver.common.by import By

    browser = _headless_chromium()
    try:
        with sc.Runtime(num_workers=2) as rt, Dashboard(rt) as dashboard:
            wait, text = _open_live(browser, dashboard.url)
            futures = [sc.submit(square, i) for i in range(10_000)]
            assert sc.gather(futures, timeout=TIMEOUT)[-1] == 9999 * 9999
            wait.until(lambda _: text("totals-finished") == "10000")
            wait.until(lambda _: text("page-info").endswith("of 10000"))
            row = browser.find_element(By.CSS_SELECTOR, "#functions tbody tr").text
            assert row.startswith("square 10000"), row
            canvas = browser.find_element(By.ID, "stream")
            assert int(canvas.get_attribute("data-records")) > 0
    finally:
        browser.quit()


def test_a_browser_off_loopback_is_asked_for_the_token_first() -> None:
    """Bound off loopback, the page sends a browser to the token form; a wrong token is
    refused there, the right one lets the live page in (its session cookie)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _headless_chromium()
    try:
        with sc.Runtime(num_workers=1) as rt, \
                Dashboard(rt, host="0.0.0.0", token="s3cret") as dashboard:
            browser.set_page_load_timeout(TIMEOUT)
            wait = WebDriverWait(browser, TIMEOUT, poll_frequency=0.1)
            browser.get(dashboard.url)
            wait.until(lambda _: browser.current_url.endswith("/login"))
            assert "cluster token" in browser.find_element(By.TAG_NAME, "body").text

            def log_in(token: str) -> None:
                field = browser.find_element(By.NAME, "token")
                field.clear()
                field.send_keys(token)
                browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()

            log_in("not it")
            wait.until(lambda _: "not the cluster token" in browser.page_source)
            assert browser.find_elements(By.ID, "connection") == []
            log_in("s3cret")
            wait.until(lambda _: browser.find_elements(By.ID, "connection"))
            wait.until(lambda _: browser.find_element(By.ID, "connection").text == "live")
            assert sc.submit(square, 6).result(timeout=TIMEOUT) == 36
            wait.until(lambda _: browser.find_element(By.ID, "totals-finished").text == "1")
    finally:
        browser.quit()


def test_init_with_dashboard_serves_it_and_shutdown_closes_it() -> None:
    runtime = sc.init(num_workers=1, dashboard=True)
    try:
        url = runtime.dashboard_url
        assert url is not None and url.startswith("http://127.0.0.1:")
        assert sc.submit(square, 7).result(timeout=TIMEOUT) == 49
        poll(lambda: get_json(url + "api/snapshot")["totals"]["finished"] >= 1, "a task seen")
    finally:
        sc.shutdown()
    with pytest.raises(urllib.error.URLError):
        get_json(url + "api/snapshot")
    assert not [t for t in threading.enumerate() if t.name.startswith("sharedcompute-dash")]


def start_head_with_dashboard(home: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``sharedcompute start --head --dashboard-port P --block`` on loopback, one worker:
    the process and its dashboard's snapshot URL (not yet answering, maybe)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "SHAREDCOMPUTE_TOKEN": CLUSTER_TOKEN, "SHAREDCOMPUTE_HOME": str(home)}
    head = subprocess.Popen(
        [sys.executable, "-m", "sharedcompute.cli", "start", "--head", "--port", "0",
         "--num-workers", "1", "--dashboard-port", str(port), "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return head, f"http://127.0.0.1:{port}/api/snapshot"


def snapshot_or_none(url: str) -> Any:
    try:
        return get_json(url)
    except (urllib.error.URLError, ConnectionError):
        return None


def test_a_head_started_with_a_dashboard_port_serves_every_node(tmp_path: Path) -> None:
    head, url = start_head_with_dashboard(tmp_path)
    try:
        snap = poll(lambda: snapshot_or_none(url), "the head's dashboard", timeout=60)
        assert [node["node_id"] for node in snap["nodes"]] == [0]
    finally:
        stop_processes([head])


def test_a_heads_dashboard_shows_the_cpu_and_memory_of_another_nodes_workers(
    tmp_path: Path,
) -> None:
    psutil = pytest.importorskip("psutil")  # the node reads its workers with it
    head, url = start_head_with_dashboard(tmp_path / "head")
    running = [head]
    try:
        address_file = tmp_path / "head" / "head.address"
        poll(lambda: address_file.exists() or head.poll() is not None, "the head", timeout=60)
        assert head.poll() is None, f"the head exited with {head.returncode}"
        node_id, node = start_node(tmp_path / "node", address_file.read_text().strip(), 1)
        running.insert(0, node)  # stopped before the head

        def measured_row() -> dict[str, Any] | None:
            snap = snapshot_or_none(url)
            rows = [w for w in snap["workers"] if w["node"] == node_id] if snap else []
            # A worker's first reading has no CPU figure: its node's second heartbeat does.
            return next((w for w in rows if isinstance(w["pid"], int) and w["rss"]
                         and w["cpu"] is not None), None)

        row = poll(measured_row, f"node {node_id}'s worker measured on the head's dashboard",
                   timeout=30)
        assert row["rss"] > 0 and row["cpu"] >= 0
        node_processes = psutil.Process(node.pid).children(recursive=True)
        assert row["pid"] in [child.pid for child in node_processes]
    finally:
        stop_processes(running)
