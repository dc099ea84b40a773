""":class:`StatusPage`: the live view, its bus, and uvicorn serving the app on a daemon thread.

The listening socket is bound in :meth:`StatusPage.start`, on the caller's thread, so a port in
use is a clear error there (not a log line on a thread nobody watches), and port 0 gives the
address the OS picked. :meth:`StatusPage.stop` asks uvicorn to finish and joins its thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Sequence

import uvicorn

from outpost.errors import ConfigError
from outpost.log import get_logger
from outpost.services.telemetry.page.app import make_app
from outpost.services.telemetry.page.live import LiveView, PointLike
from outpost.services.telemetry.page.settings import PageSettings, page_url
from outpost.settings import CoreSettings

log = get_logger("outpost.telemetry.page")


class _Server(uvicorn.Server):
    """uvicorn's server with its housekeeping loop woken once a second, or at once by
    :meth:`exit_now`, instead of every 0.1 s: that loop only refreshes the ``Date`` header (a
    second's resolution) and looks for the exit, and its ten wake-ups a second were half of an
    idle telemetry service's (docs/benchmarks.md, "The site at idle"). It follows uvicorn
    0.54's ``main_loop`` (pinned in pyproject.toml): ``on_tick`` refreshes the header when the
    counter is a multiple of ten, so it is always given one."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._loop, self._exit = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864_000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit.wait(), 1.0)

    def exit_now(self) -> None:
        """From any thread: finish (the graceful shutdown follows, as after ``should_exit``)."""
        self.should_exit = True
        loop, event = self._loop, self._exit
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # its loop has closed already
                loop.call_soon_threadsafe(event.set)


class StatusPage:
    """The gateway's status page and Prometheus endpoint (docs/telemetry.md, Status page)."""

    def __init__(self, page: PageSettings, settings: CoreSettings) -> None:
        self.page = page
        self.view = LiveView(
            settings.mqtt,
            settings.topics,
            client_id=f"{settings.prefix}-status-page-{settings.site}-{os.getpid()}",
            history_s=page.history_s,
        )
        self.app = make_app(self.view, page)
        self.url: str | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def start(self, wait_s: float = 10.0) -> str:
        """Listen, serve on a daemon thread, and follow the broker (in the background: the page
        says when the broker is not there). Returns the page's address, ``http://host:port/``."""
        family = socket.AF_INET6 if ":" in self.page.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.page.host, self.page.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"status page: cannot listen on {self.page.host}:{self.page.port} ({exc.strerror or exc}); "
                "set telemetry.page.port to a free port, or 0 for any"
            ) from None
        sock.listen(128)
        self._sock = sock
        port = int(sock.getsockname()[1])
        # log_config None: uvicorn's few warnings go through the service's own logging (JSON or
        # not), not through handlers of its own; no access log (the page polls every second)
        config = uvicorn.Config(
            self.app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = _Server(config)
        started = threading.Event()
        server = self._server

        def serve() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException:  # SystemExit from uvicorn's startup included: said, not raised
                log.exception("status page server stopped")
            finally:
                started.set()

        self._thread = threading.Thread(target=serve, name="status-page", daemon=True)
        self._thread.start()
        self.view.bus.start(wait_s=None)  # a broker not there yet: the page shows it, the bus retries
        deadline = time.monotonic() + wait_s
        while not server.started and not started.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not server.started:
            self.stop()
            raise ConfigError(f"status page: the server did not start on {self.page.host}:{port}")
        self.url = page_url(self.page.host, port)
        log.info("status page", extra={"url": self.url})
        return self.url

    def on_rollup(self, points: Sequence[PointLike]) -> None:
        """Each closed rollup window's points (the telemetry service's): the page shows the latest."""
        self.view.add_rollups(points)

    def stop(self) -> None:
        if self._server is not None:
            self._server.exit_now()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.view.stop()
