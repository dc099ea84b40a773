"""A simulated store API: the HTTP peer the connector gateway acts on in tests, the demo and the
benchmark. It behaves like a careful SaaS API, and fails on command like a real one.

* ``POST /reorders``, ``POST /tickets``, ``POST /notify`` (JSON): each takes effect once per
  ``Idempotency-Key``; a key seen before gets the stored answer again with
  ``Idempotent-Replayed: true`` (a second request with a key still in progress waits for the first).
* ``POST /oauth/token``: OAuth2 client credentials (RFC 6749 4.4, the client's id and secret with
  HTTP Basic); with auth on, every other call needs ``Authorization: Bearer`` with a live token.
* ``GET /_effects``: what took effect, by key (path, body, ``effects`` and ``requests`` counts);
  ``GET /_arrivals``: every request to an action path in arrival order, stamped by the peer's clock
  (what rate-limit and order tests measure); ``GET /_stats``: token fetches and the like;
  ``GET /_issued``: every access token issued (what a leak test looks for).
* ``POST /_faults`` (JSON, fields optional): ``fail_next: N`` (the next N calls answer 500, no
  effect), ``status: S`` with ``count`` and ``retry_after`` (the next ``count`` calls answer S,
  Retry-After set when given), ``slow_ms: M`` (every call waits M ms before its effect or its fault),
  ``down: true`` with ``down_s`` (stop listening: connections are refused, open ones cut; back after
  ``down_s``, or on :meth:`StoreAPI.up` in-process), ``revoke_tokens: true``, ``token_ttl_s: T``
  (``expires_in`` of the tokens issued next), ``echo_headers: true`` (error answers carry the
  request's headers, as a careless API does: a leak test's bait), ``auth: bool``.

Faulted answers (5xx, 429, 4xx) have no effect and are not stored against the key, so the request's
next try is carried out. ``python -m outpost.sim.store_api --port P`` runs it in the foreground.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import orjson

ACTION_PATHS = frozenset(("/reorders", "/tickets", "/notify"))


@dataclass(slots=True)
class Effect:
    path: str
    body: Any
    effects: int = 0
    """Times it took effect: 1 where the key did its job."""
    requests: int = 0
    """Requests that carried the key (tries, retries, replays)."""
    status: int = 201
    answer: bytes = b""


@dataclass(slots=True)
class Faults:
    fail: int = 0
    fail_status: int = 500
    retry_after: float | None = None
    slow_ms: float = 0.0
    echo_headers: bool = False


@dataclass(slots=True)
class State:
    effects: dict[str, Effect] = field(default_factory=dict)
    per_path: dict[str, int] = field(default_factory=dict)
    """Effects so far by path (the next one's id), kept as they are made: counting them in
    ``effects`` at each call cost O(keys) and slowed the peer down as a benchmark ran."""
    arrivals: list[dict[str, Any]] = field(default_factory=list)
    tokens: dict[str, float] = field(default_factory=dict)
    """Live access token -> its expiry (monotonic)."""
    token_fetches: int = 0
    issued: list[str] = field(default_factory=list)
    """Every access token issued (a leak test looks for them where they must not be)."""
    unauthorized: int = 0
    inflight: int = 0
    """Calls being answered now (each arrival notes how many, itself included: ``concurrent``)."""
    faults: Faults = field(default_factory=Faults)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], api: StoreAPI) -> None:
        self.api = api
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.conns_lock:
            self.conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.conns_lock:
            self.conns.discard(request)
        super().shutdown_request(request)

    def cut(self) -> None:
        """Cut every open connection (what a peer going down does to keep-alive clients)."""
        with self.conns_lock:
            conns = list(self.conns)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class StoreAPI:
    """The simulated store API on ``host:port`` (0: a free port, kept across :meth:`down`/:meth:`up`)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        auth: bool = False,
        client_id: str = "outpost",
        client_secret: str = "store-secret",
        token_ttl_s: float = 3600.0,
    ) -> None:
        self.host = host
        self.port = port
        self.auth = auth
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_ttl_s = token_ttl_s
        self.state = State()
        self.lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._up_timer: threading.Timer | None = None

    # --- lifecycle --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def listening(self) -> bool:
        return self._server is not None

    def start(self) -> StoreAPI:
        server = _Server((self.host, self.port), self)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="store-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._up_timer is not None:
            self._up_timer.cancel()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            server.cut()
        if self._thread is not None:
            self._thread.join(10)

    def down(self, for_s: float | None = None) -> None:
        """Stop listening (connections refused, open ones cut); back after ``for_s`` if given."""
        self.stop()
        if for_s is not None:
            self._up_timer = threading.Timer(for_s, self.up)
            self._up_timer.daemon = True
            self._up_timer.start()

    def up(self) -> None:
        if self._server is None:
            self.start()

    # --- what the tests read and set --------------------------------------------------------------
    def effects(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {
                k: {"path": e.path, "body": e.body, "effects": e.effects, "requests": e.requests}
                for k, e in self.state.effects.items()
            }

    def arrivals(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(a) for a in self.state.arrivals]

    def stats(self) -> dict[str, Any]:
        with self.lock:
            s = self.state
            return {
                "token_fetches": s.token_fetches,
                "live_tokens": len(s.tokens),
                "unauthorized": s.unauthorized,
                "arrivals": len(s.arrivals),
                "effects": sum(e.effects for e in s.effects.values()),
            }

    def issued(self) -> list[str]:
        with self.lock:
            return list(self.state.issued)

    def faults(self, **spec: Any) -> None:
        """What ``POST /_faults`` takes (module docstring)."""
        with self.lock:
            f = self.state.faults
            if "fail_next" in spec:
                f.fail, f.fail_status, f.retry_after = int(spec["fail_next"]), 500, None
            if "status" in spec:
                f.fail, f.fail_status = int(spec.get("count", 1)), int(spec["status"])
                ra = spec.get("retry_after")
                f.retry_after = None if ra is None else float(ra)
            if "slow_ms" in spec:
                f.slow_ms = float(spec["slow_ms"])
            if "echo_headers" in spec:
                f.echo_headers = bool(spec["echo_headers"])
            if "token_ttl_s" in spec:
                self.token_ttl_s = float(spec["token_ttl_s"])
            if "auth" in spec:
                self.auth = bool(spec["auth"])
            if spec.get("revoke_tokens"):
                self.state.tokens.clear()
        if spec.get("down"):
            ds = spec.get("down_s")
            for_s = None if ds is None else float(ds)

            def later() -> None:  # from a request's own thread: once its answer is out
                time.sleep(0.05)
                self.down(for_s)

            threading.Thread(target=later, daemon=True).start()

    # --- request handling (handler threads) -------------------------------------------------------
    def _token(self, handler: _Handler) -> tuple[int, dict[str, Any]]:
        got = handler.headers.get("Authorization", "")
        scheme, _, cred = got.partition(" ")
        try:
            cid, _, secret = base64.b64decode(cred).decode().partition(":")
        except ValueError:
            cid, secret = "", ""
        if scheme.lower() != "basic" or cid != self.client_id or secret != self.client_secret:
            return 401, {"error": "invalid_client"}
        form = parse_qs(handler.body.decode(errors="replace"))
        if form.get("grant_type") != ["client_credentials"]:
            return 400, {"error": "unsupported_grant_type"}
        token = secrets.token_urlsafe(24)
        with self.lock:
            ttl = self.token_ttl_s
            self.state.tokens[token] = time.monotonic() + ttl
            self.state.token_fetches += 1
            self.state.issued.append(token)
        return 200, {"access_token": token, "token_type": "bearer", "expires_in": ttl}

    def _authorized(self, handler: _Handler) -> bool:
        if not self.auth:
            return True
        scheme, _, token = handler.headers.get("Authorization", "").partition(" ")
        with self.lock:
            expires = self.state.tokens.get(token) if scheme.lower() == "bearer" else None
            ok = expires is not None and time.monotonic() < expires
            if not ok:
                self.state.unauthorized += 1
            return ok

    def _action(self, handler: _Handler) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self.lock:
            self.state.inflight += 1
            concurrent = self.state.inflight
        try:
            return self._act(handler, concurrent)
        finally:
            with self.lock:
                self.state.inflight -= 1

    def _act(self, handler: _Handler, concurrent: int) -> tuple[int, dict[str, Any], dict[str, str]]:
        path = handler.path
        key = handler.headers.get("Idempotency-Key")
        arrival: dict[str, Any] = {"path": path, "key": key, "t_ns": time.monotonic_ns()}
        arrival["concurrent"] = concurrent
        try:
            body = orjson.loads(handler.body)
        except orjson.JSONDecodeError:
            body = None
        arrival["body"] = body
        authorized = self._authorized(handler)
        with self.lock:
            self.state.arrivals.append(arrival)
            f = self.state.faults
            if not authorized:
                arrival["status"] = 401
                return 401, self._error(handler, "invalid or expired token", f), {}
            slow = f.slow_ms
            if f.fail > 0:
                f.fail -= 1
                status, ra = f.fail_status, f.retry_after
                arrival["status"] = status
                extra = {} if ra is None else {"Retry-After": f"{ra:g}"}
                doc = self._error(handler, "fault on command", f)
            else:
                status = 0
        if status:
            if slow:  # a slow peer is slow to fail too
                time.sleep(slow / 1000.0)
            return status, doc, extra
        with self.lock:
            if key is None:
                key = "unkeyed-" + secrets.token_hex(8)
            lock = self._key_locks.setdefault(key, threading.Lock())
        if not isinstance(body, dict):
            arrival["status"] = 400
            return 400, {"error": "a JSON object is expected"}, {}
        with lock:  # a second try of a key in progress waits for the first, then replays it
            with self.lock:
                e = self.state.effects.get(key)
                if e is not None:
                    e.requests += 1
                    arrival["status"], arrival["replayed"] = e.status, True
                    return e.status, orjson.loads(e.answer), {"Idempotent-Replayed": "true"}
            if slow:
                time.sleep(slow / 1000.0)
            with self.lock:
                n = self.state.per_path[path] = self.state.per_path.get(path, 0) + 1
                answer = {"id": f"{path.strip('/')}-{n}", "key": key, "accepted": body}
                self.state.effects[key] = Effect(path, body, 1, 1, 201, orjson.dumps(answer))
                arrival["status"] = 201
            return 201, answer, {}

    @staticmethod
    def _error(handler: _Handler, why: str, f: Faults) -> dict[str, Any]:
        doc: dict[str, Any] = {"error": why}
        if f.echo_headers:
            doc["headers"] = dict(handler.headers.items())
        return doc


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    """TCP_NODELAY: the headers and the body go out in two writes; with Nagle on, the body waits for
    the client's delayed ACK of the headers (about 40 ms a call on a keep-alive connection)."""
    server: _Server
    body: bytes = b""

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read /_arrivals, not an access log."""

    def _read(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(n) if n else b""

    def _send(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        data = orjson.dumps(doc)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        with contextlib.suppress(OSError):  # the client is gone (killed mid-call): the effect stands
            self.wfile.write(data)

    def do_GET(self) -> None:
        api = self.server.api
        if self.path == "/_effects":
            self._send(200, api.effects())
        elif self.path == "/_arrivals":
            self._send(200, api.arrivals())
        elif self.path == "/_stats":
            self._send(200, api.stats())
        elif self.path == "/_issued":
            self._send(200, api.issued())
        else:
            self._send(404, {"error": f"no {self.path}"})

    def do_POST(self) -> None:
        api = self.server.api
        self._read()
        if self.path in ACTION_PATHS:
            self._send(*api._action(self))
        elif self.path == "/oauth/token":
            self._send(*api._token(self))
        elif self.path == "/_faults":
            try:
                spec = orjson.loads(self.body or b"{}")
                if not isinstance(spec, dict):
                    raise ValueError("a JSON object is expected")
                api.faults(**spec)
            except (ValueError, TypeError) as exc:
                self._send(400, {"error": str(exc)})
                return
            self._send(200, {"ok": True})
        else:
            self._send(404, {"error": f"no {self.path}"})


def keep_collections_short(interval_s: float = 1.0) -> None:
    """In a process of its own (``main``), the API's state (an effect per key) grows with every
    request, and Python's full collections walk all of it: 25-73 ms pauses late in a benchmark run,
    which read as the connector gateway's tail (its p99.9 fell from 8-58 ms to 6-7 ms with them
    gone; docs/benchmarks.md). Every ``interval_s`` the young generations are collected (so the
    last second's garbage cycles go) and what survives is frozen: never walked again."""

    def run() -> None:
        while True:
            time.sleep(interval_s)
            gc.collect(1)
            gc.freeze()

    threading.Thread(target=run, name="gc-freeze", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m outpost.sim.store_api", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--auth", action="store_true", help="Require an OAuth2 bearer token.")
    p.add_argument("--client-id", default="outpost")
    p.add_argument("--client-secret", default="store-secret")
    p.add_argument("--token-ttl", type=float, default=3600.0)
    a = p.parse_args(argv)
    api = StoreAPI(
        a.host,
        a.port,
        auth=a.auth,
        client_id=a.client_id,
        client_secret=a.client_secret,
        token_ttl_s=a.token_ttl,
    ).start()
    keep_collections_short()
    print(f"store api on {api.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        api.stop()


if __name__ == "__main__":
    main()
