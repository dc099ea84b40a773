"""The writer: line protocol to an InfluxDB v2 write API (InfluxDB 2, or VictoriaMetrics which
speaks it) through influxdb-client, synchronously, from the service's worker thread (never the
network thread). One call is one request; retries with backoff are the service's (a failed
write's points stay in the spool and the next attempt waits, :func:`outpost.backoff.backoff_delay`).

The token goes into the client's Authorization header and nowhere else: a failure is reported as
:class:`WriteFailed` with a message made here (status, reason, a short body) with any copy of the
token cut out, never the client's own exception text, which carries the request's headers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import cast

from outpost.errors import OutpostError
from outpost.services.telemetry.settings import InfluxSettings

for _name in ("influxdb_client", "urllib3"):  # their debug lines would show request headers
    logging.getLogger(_name).setLevel(logging.WARNING)


class WriteFailed(OutpostError):  # noqa: N818 - an outcome the service retries, not a bug
    """A write the store did not take: its points stay spooled and are tried again after a backoff.
    ``status``: the HTTP status when the store answered (401/403: the token; 404: org or bucket)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Writer:
    def __init__(self, cfg: InfluxSettings) -> None:
        if cfg.url is None:
            raise ValueError("no influx.url: nothing to write to")
        self.cfg = cfg
        self._token = cfg.token.get_secret_value() if cfg.token is not None else ""
        # imported here, after the telemetry service is forked: a third of a second less for the
        # zygote to import before any service can start (outpost.zygote)
        from influxdb_client.client.influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        self.client = InfluxDBClient(
            url=cfg.url,
            token=self._token,
            org=cfg.org,
            timeout=int(cfg.timeout_s * 1000),
            enable_gzip=False,
            retries=False,
        )
        self.api = self.client.write_api(write_options=SYNCHRONOUS)

    def _clean(self, text: str) -> str:
        if self._token:
            text = text.replace(self._token, "***")
        return text[:300]

    def write(self, lines: Sequence[str]) -> int:
        """Write ``lines`` (one request); returns the bytes of the body sent. Raises WriteFailed."""
        from influxdb_client.domain.write_precision import WritePrecision
        from influxdb_client.rest import ApiException

        body = "\n".join(lines)
        try:
            self.api.write(
                bucket=self.cfg.bucket,
                org=self.cfg.org,
                record=body,
                write_precision=cast(WritePrecision, WritePrecision.NS),
            )
        except ApiException as exc:
            raw = exc.body if isinstance(exc.body, (bytes, str)) else b""
            text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
            raise WriteFailed(
                self._clean(f"the store refused the write: HTTP {exc.status} {exc.reason}: {text.strip()}"),
                status=exc.status,
            ) from None
        except Exception as exc:  # noqa: BLE001 - urllib3's connection errors and the like
            raise WriteFailed(
                self._clean(f"cannot reach the store at {self.cfg.url}: {type(exc).__name__}: {_root(exc)}")
            ) from None
        return len(body.encode()) + 1

    def close(self) -> None:
        try:
            self.api.close()  # type: ignore[no-untyped-call]
        finally:
            self.client.close()  # type: ignore[no-untyped-call]


def _root(exc: BaseException) -> str:
    """The innermost cause's message (urllib3 wraps a refused connection in two layers)."""
    seen = exc
    while seen.__cause__ is not None or getattr(seen, "reason", None) is not None:
        nxt = seen.__cause__ or getattr(seen, "reason", None)
        if not isinstance(nxt, BaseException) or nxt is seen:
            break
        seen = nxt
    return str(seen)
