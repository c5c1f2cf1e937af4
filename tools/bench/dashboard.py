"""What watching costs: a task job with and without the dashboard and a page open on it.

Usage::

    python tools/bench/dashboard.py [--tasks 10000] [--workers 4] [--repeats 5] [--json]

One runtime (``sc.Runtime(num_workers=W)``) runs the job ``R`` times each way, the two
ways taking turns (who goes first alternates), so load that comes and goes on the machine
falls on both alike::

    without   sc.gather([sc.submit(square, i) for i in range(N)])
    with      the same, while a Dashboard serves the runtime and a headless Chromium
              (Debian's chromium + chromedriver, through selenium) has its page open and
              live over the WebSocket; after the timed job the page must count all N

The page is opened (and the browser started) outside the timed part; it is closed with the
dashboard after each "with" round, so "without" rounds pay nothing for it. Reported: the
median seconds each way, their ratio (with / without: the issue's bar is < 1.05), the
runtime process's peak RSS growth while served, and the dashboard's own answer
(``/api/snapshot``) time at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
import urllib.request
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))))

from tools.bench._common import markdown_table

PAGE_TIMEOUT = 120.0


def square(x: int) -> int:
    return x * x


def _browser() -> Any:
    from selenium import webdriver

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        raise SystemExit("needs chromium and chromedriver (apt-get install chromium "
                         "chromium-driver) and selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--disable-gpu", "--window-size=1400,1500"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options,
                            service=webdriver.ChromeService(executable_path=driver))


def _job(sc: Any, tasks: int) -> float:
    start = time.perf_counter()
    futures = [sc.submit(square, i) for i in range(tasks)]
    values = sc.gather(futures, timeout=600)
    elapsed = time.perf_counter() - start
    assert values[-1] == (tasks - 1) ** 2
    return elapsed


def _watched(sc: Any, rt: Any, browser: Any, tasks: int) -> tuple[float, int, float]:
    """One job with a dashboard and a live page: its seconds, the process's RSS growth,
    and how long ``/api/snapshot`` then takes (ms)."""
    import psutil
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from sharedcompute.dashboard import Dashboard

    me = psutil.Process()
    before = me.memory_info().rss
    with Dashboard(rt) as dashboard:
        browser.set_page_load_timeout(PAGE_TIMEOUT)
        browser.get(dashboard.url)
        wait = WebDriverWait(browser, PAGE_TIMEOUT, poll_frequency=0.2)

        def text(element_id: str) -> str:
            return str(browser.find_element(By.ID, element_id).text)

        wait.until(lambda _: text("connection") == "live")
        shown = int(text("totals-finished"))
        seconds = _job(sc, tasks)
        wait.until(lambda _: int(text("totals-finished")) >= shown + tasks)
        growth = me.memory_info().rss - before
        start = time.perf_counter()
        with urllib.request.urlopen(dashboard.url + "api/snapshot", timeout=30) as reply:
            reply.read()
        snapshot_ms = (time.perf_counter() - start) * 1000
        browser.get("about:blank")
    return seconds, growth, snapshot_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import sharedcompute as sc

    without: list[float] = []
    watched: list[float] = []
    rss_growth = 0
    snapshot_ms = 0.0
    browser = _browser()
    try:
        with sc.Runtime(num_workers=args.workers) as rt:
            _job(sc, min(args.tasks, 1000))  # workers up, functions known
            for round_ in range(args.repeats):
                for way in (("without", "with") if round_ % 2 == 0 else ("with", "without")):
                    if way == "without":
                        without.append(_job(sc, args.tasks))
                        continue
                    seconds, growth, snapshot_ms = _watched(sc, rt, browser, args.tasks)
                    watched.append(seconds)
                    rss_growth = max(rss_growth, growth)
    finally:
        browser.quit()

    results = {
        "tasks": args.tasks, "workers": args.workers, "repeats": args.repeats,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "without_s": statistics.median(without), "with_s": statistics.median(watched),
        "ratio": statistics.median(watched) / statistics.median(without),
        "samples_without_s": without, "samples_with_s": watched,
        "rss_growth_bytes": rss_growth, "snapshot_ms": snapshot_ms,
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(markdown_table(
        ["tasks", "workers", "without (median s)", "with a page open (median s)",
         "with / without", "RSS growth", "/api/snapshot"],
        [[args.tasks, args.workers, f"{results['without_s']:.3f}",
          f"{results['with_s']:.3f}", f"{results['ratio']:.3f}",
          f"{rss_growth / 2**20:.1f} MiB", f"{snapshot_ms:.1f} ms"]],
    ))


if __name__ == "__main__":
    main()
