"""The status page in a real browser (Debian's chromium, driven by playwright) over a real stack:
our own Mosquitto, every service supervised, the retail simulator feeding it. The page loads, its
charts draw the site's real figures, nothing is asked of any host but the gateway, and a screenshot
is saved in the test's folder."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from playwright.sync_api import Request, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from outpost.broker import Mosquitto, port_open
from outpost.bus import Bus
from outpost.datadir import read_run
from outpost.services.registry import OutpostSettings
from outpost.services.telemetry.page.server import StatusPage
from outpost.services.telemetry.page.settings import PageSettings
from outpost.settings import BrokerSettings
from outpost.sim import SimOptions, run
from outpost.stack import Stack
from tests.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT_TO = "STATUS_PAGE_SCREENSHOT_TO"
"""Set to a path to copy the screenshot there too (docs/images/status-page.png was made so). Not an
OUTPOST_* name: the stack's services refuse settings they do not know."""

EVIL = '<img src="nowhere.png" onerror="window.pwned = 1">'

DRAWN = """() => {
  const p = window.outpostPage;
  if (!p || !p.live) return false;
  const t = p.live.throughput.chart;
  const lat = p.live.latency.find((s) => s.service === "ingest" && s.name === "reading_age");
  return p.drawn.throughput >= 3 && t.readings_per_s.some((v) => v > 0)
    && lat !== undefined && p.drawn.latency["ingest/reading_age"] >= 3 && lat.chart.p99_ms.some((v) => v > 0)
    && Number(document.getElementById("chart-throughput").dataset.points) >= 3
    && ["ingest", "inference", "memory", "agents", "connectors"].every(
      (n) => p.live.services.some((s) => s.name === n && s.state === "online"))
    && p.live.dlq.length > 0;
}"""

HELD = "() => { const p = window.outpostPage; return {drawn: p.drawn, live: p.live, polls: p.polls}; }"


def _held(state: dict[str, Any]) -> str:
    """What the page held when it did not draw in time, short enough for a failure message."""
    live = state.get("live") or {}
    return repr(
        {
            "polls": state.get("polls"),
            "drawn": state.get("drawn"),
            "services": {s["name"]: (s["state"], s["health"]) for s in live.get("services", [])},
            "readings_per_s": (live.get("throughput") or {}).get("readings_per_s"),
            "dlq": live.get("dlq"),
        }
    )


@pytest.fixture
def stack(tmp_path: Path, site: str) -> Iterator[Stack]:
    data = tmp_path / "site"
    data.mkdir()
    data.chmod(0o755)  # the broker drops to the user mosquitto and must reach its data folder
    # auth off: the test plays a hostile publisher that got onto the broker (docs/security.md)
    settings = OutpostSettings(site=site, data_dir=data, broker=BrokerSettings(auth=False))
    s = Stack(settings, env={"OUTPOST_TELEMETRY__METRICS_INTERVAL_S": "0.5"})
    s.start()
    yield s
    s.stop()


def test_the_page_draws_a_running_site_in_chromium(stack: Stack, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM}; `make deps` installs it)")
    settings = stack.settings
    page_server = StatusPage(PageSettings(port=0, poll_s=0.5), settings)
    url = page_server.start()
    stop_sim = threading.Event()
    opts = SimOptions.from_settings(
        settings, scenario="retail", devices=12, rate=300, duration=300, bad_ratio=0.05, processes=1, qos=1
    )
    sim = threading.Thread(target=run, args=(opts,), kwargs={"stop": stop_sim}, daemon=True)
    requests: list[str] = []
    shot = tmp_path / "status-page.png"
    try:
        assert wait_until(lambda: page_server.view.bus.connected, 30)
        # a hostile publisher on the same broker: markup in a status, garbage as metrics
        hostile = Bus(settings.mqtt, client_id=f"hostile-{settings.site}")
        hostile.start(wait_s=30)
        status = {"service": EVIL, "state": "online", "problems": [EVIL]}
        hostile.publish(settings.topics.service_status("evil"), orjson.dumps(status), qos=1, retain=True)
        hostile.publish(settings.topics.metrics("ingest"), b'{"service": "ingest", "counters": [1]}', qos=1)
        hostile.stop()
        sim.start()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.on("request", lambda r: requests.append(_url(r)))
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(url)
                try:
                    page.wait_for_function(DRAWN, timeout=120_000, polling=250)
                except PlaywrightTimeout:
                    pytest.fail(f"the page never drew the site: it holds {_held(page.evaluate(HELD))}")
                live: dict[str, Any] = page.evaluate("() => window.outpostPage.live")
                pwned = page.evaluate("() => window.pwned === undefined ? null : window.pwned")
                shown = page.inner_text("#services")
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
    finally:
        stop_sim.set()
        sim.join(30)
        page_server.stop()
    assert errors == []
    assert pwned is None and EVIL in shown  # names from the broker are text, never markup
    assert live["ignored_metrics"] >= 1
    # real figures: ingest's rates and the interval quantiles from its sketches
    assert max(live["throughput"]["chart"]["readings_per_s"]) > 0
    assert {"ingest", "inference", "memory", "agents", "connectors"} <= {s["name"] for s in live["services"]}
    assert any(r["service"] == "ingest" for r in live["dlq"])  # the simulator's bad payloads
    # every request the page made went to the gateway, on loopback
    assert requests and all(
        urlsplit(u).hostname == "127.0.0.1" for u in requests if not u.startswith("data:")
    )
    assert {urlsplit(u).path for u in requests} >= {"/", "/api/live", "/static/vendor/uPlot.iife.min.js"}
    assert shot.stat().st_size > 10_000
    if os.environ.get(SCREENSHOT_TO):
        shutil.copyfile(shot, os.environ[SCREENSHOT_TO])


def _url(r: Request) -> str:
    return r.url


def test_the_page_serves_and_stops_cleanly_and_the_run_file_has_it(
    settings: OutpostSettings, broker: Mosquitto, tmp_path: Path
) -> None:
    page_server = StatusPage(PageSettings(port=0), settings)
    url = page_server.start()
    try:
        assert wait_until(lambda: httpx.get(url + "healthz").status_code == 200)
        assert httpx.get(url + "metrics").text.count("outpost_service_up") >= 1
        port = urlsplit(url).port
        assert port is not None
        # what `outpost up` does with the address: the run file says where the page is
        data = tmp_path / "run-site"
        data.mkdir()
        with Stack(OutpostSettings(site=settings.site, data_dir=data), services={}, status_page=url):
            info = read_run(data)
            assert info is not None and info.status_page == url
    finally:
        page_server.stop()
    assert not port_open("127.0.0.1", port)  # uvicorn finished and the socket is closed
    assert page_server._thread is None
