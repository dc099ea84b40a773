"""``kind: http``: a SaaS or REST API over HTTP(S), with keep-alive connections of the standard
library's ``http.client``, one per worker thread: a call costs ~65 us of CPU against httpx's ~430 us
(measured against the simulated store API), and that cost sets how many actions/s one gateway can
carry (docs/benchmarks.md, "Connectors").

The request's idempotency key goes in a header (``Idempotency-Key`` unless the endpoint names
another), so an endpoint that honours it carries a request out once however often it is sent. An
answer of 429 or 503 with Retry-After is tried again no sooner than it says; 408, 425, 5xx, a
timeout and a refused connection are tried again with backoff; any other 4xx is final. Auth: a
bearer token from the secret store, or OAuth2 client credentials whose token is fetched, cached and
refreshed before it expires (and once more on a 401).
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import ssl
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import Field

from outpost.services.connectors.kinds.base import Context, Kind, Outcome, Request, SecretRef, Strict
from outpost.services.connectors.secrets import redact_tree

RETRY_STATUSES = frozenset((408, 425, 429, 500, 502, 503, 504))
RESULT_MAX = 4000
"""Characters of an answer kept as the result (the audit trail), past which it is cut."""


class Bearer(Strict):
    kind: Literal["bearer"] = "bearer"
    token: SecretRef
    header: str = "Authorization"
    scheme: str = "Bearer"


class OAuth2(Strict):
    """OAuth2 client credentials (RFC 6749 4.4): the client id and secret are sent with HTTP Basic."""

    kind: Literal["oauth2"] = "oauth2"
    token_url: str = Field(pattern=r"^https?://")
    client_id: str = Field(min_length=1, max_length=256)
    client_secret: SecretRef
    scope: str | None = None
    refresh_before_s: float = Field(30.0, ge=0, description="Fetch a new token this long before expiry.")


class Endpoint(Strict):
    base_url: str = Field(pattern=r"^https?://[^\s]+$", description="http(s)://host[:port][/prefix]")
    headers: dict[str, str] = Field(default_factory=dict, description="Sent with every request.")
    auth: Bearer | OAuth2 | None = Field(None, discriminator="kind")
    idempotency_header: str | None = Field(
        "Idempotency-Key", description="Where the request's key goes; null for an API that takes none."
    )
    verify_tls: bool = True


class Op(Strict):
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    path: str = Field("", max_length=1000, description="Under base_url; {field} is the args' value, quoted.")
    body: Literal["args", "none"] = Field("args", description="args: the request's args as JSON.")


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str:
        return str(self.headers.get(name, ""))

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class Transport:
    """HTTP/1.1 to one origin: a keep-alive connection per thread. A connection the peer closed
    while idle is opened again once, on the spot (the request is sent again: the idempotency key
    keeps that safe); a timeout or any other failure is the caller's transient outcome."""

    def __init__(self, base_url: str, timeout_s: float, verify_tls: bool, headers: dict[str, str]) -> None:
        u = urllib.parse.urlsplit(base_url)
        self.https = u.scheme == "https"
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (443 if self.https else 80)
        self.prefix = u.path.rstrip("/")
        self.timeout_s = timeout_s
        self.headers = dict(headers)
        self.tls: ssl.SSLContext | None = None
        if self.https:
            self.tls = ssl.create_default_context()
            if not verify_tls:
                self.tls.check_hostname = False
                self.tls.verify_mode = ssl.CERT_NONE
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[http.client.HTTPConnection] = []

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self.tls is not None:
                conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout_s, context=self.tls
                )
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            self._local.conn, self._local.used = conn, 0
            with self._lock:
                self._open.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            with self._lock:
                if conn in self._open:
                    self._open.remove(conn)
        self._local.conn = None

    def request(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> Reply:
        """Raises TimeoutError, OSError or http.client.HTTPException when no answer came."""
        all_headers = {**self.headers, **headers}
        if body is not None:
            all_headers.setdefault("Content-Type", "application/json")
        for attempt in (0, 1):
            conn = self._connection()
            reused = self._local.used > 0
            try:
                conn.request(method, self.prefix + path, body=body, headers=all_headers)
                r = conn.getresponse()
                data = r.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._drop()
                if reused and attempt == 0:
                    continue  # the peer closed an idle keep-alive connection: once more, fresh
                raise
            except BaseException:
                self._drop()
                raise
            self._local.used += 1
            if r.will_close:
                self._drop()
            return Reply(r.status, r.headers, data)
        raise ConnectionError("unreachable")  # the loop returns or raises

    def close(self) -> None:
        with self._lock:
            conns, self._open = self._open, []
        for conn in conns:
            conn.close()


class TokenCache:
    """One OAuth2 access token, shared by the connector's calls, fetched when missing or about to
    expire; thread-safe (calls run on several worker threads)."""

    def __init__(self, auth: OAuth2, timeout_s: float, verify_tls: bool, resolve: Any) -> None:
        self.auth = auth
        self.http = Transport(auth.token_url, timeout_s, verify_tls, {})
        self.resolve = resolve
        self._lock = threading.Lock()
        self._token = ""
        self._refresh_at = 0.0
        self.fetched = 0

    def token(self) -> str:
        with self._lock:
            if not self._token or time.monotonic() >= self._refresh_at:
                self._fetch()
            return self._token

    def forget(self, token: str) -> None:
        with self._lock:
            if self._token == token:
                self._token = ""

    def _fetch(self) -> None:
        data = {"grant_type": "client_credentials"}
        if self.auth.scope:
            data["scope"] = self.auth.scope
        secret = self.resolve(self.auth.client_secret)
        basic = base64.b64encode(f"{self.auth.client_id}:{secret}".encode()).decode()
        headers = {"Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"}
        try:
            r = self.http.request("POST", "", headers, urllib.parse.urlencode(data).encode())
        except (OSError, http.client.HTTPException) as exc:
            raise TokenError(f"token endpoint: {type(exc).__name__}", True) from None
        if r.status != 200:
            raise TokenError(
                f"token endpoint answered {r.status}", r.status in RETRY_STATUSES or r.status >= 500
            )
        try:
            doc = orjson.loads(r.body)
        except orjson.JSONDecodeError:
            raise TokenError("token endpoint answered no JSON", False) from None
        if not isinstance(doc, dict):
            raise TokenError("token endpoint answered no JSON object", False)
        token, ttl = doc.get("access_token"), doc.get("expires_in", 3600)
        if not isinstance(token, str) or not token:
            raise TokenError("token endpoint gave no access_token", False)
        self._token = token
        ttl = float(ttl)
        # refresh_before_s ahead of expiry, or halfway for a token that lives less than twice that
        self._refresh_at = time.monotonic() + ttl - min(self.auth.refresh_before_s, ttl / 2)
        self.fetched += 1


class TokenError(Exception):
    def __init__(self, detail: str, retry: bool) -> None:
        super().__init__(detail)
        self.retry = retry


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class HttpClient:
    def __init__(self, endpoint: Endpoint, timeout_s: float, ctx: Context) -> None:
        self.endpoint = endpoint
        self.http = Transport(endpoint.base_url, timeout_s, endpoint.verify_tls, endpoint.headers)
        self.resolve = ctx.resolve
        auth = endpoint.auth
        self.tokens = (
            TokenCache(auth, timeout_s, endpoint.verify_tls, ctx.resolve)
            if isinstance(auth, OAuth2)
            else None
        )

    def call(self, op: Op, requests: Sequence[Request]) -> list[Outcome]:
        return [self._one(op, r) for r in requests]

    def _one(self, op: Op, req: Request, *, again: bool = False) -> Outcome:
        try:
            path = op.path.format_map(_Quoted(req.args))
        except (KeyError, IndexError, ValueError) as exc:
            return Outcome(False, f"path {op.path!r} names what args lack: {exc}")
        headers = {"X-Outpost-Trace": header_value(req.trace)}
        if self.endpoint.idempotency_header:
            headers[self.endpoint.idempotency_header] = header_value(req.key)
        token = ""
        auth = self.endpoint.auth
        try:
            if isinstance(auth, Bearer):
                headers[auth.header] = f"{auth.scheme} {self.resolve(auth.token)}".strip()
            elif self.tokens is not None:
                token = self.tokens.token()
                headers["Authorization"] = f"Bearer {token}"
            r = self.http.request(
                op.method, path, headers, orjson.dumps(req.args) if op.body == "args" else None
            )
        except TokenError as exc:
            return Outcome(False, f"oauth2: {exc}", retry=exc.retry)
        except KeyError as exc:
            return Outcome(False, f"no secret {exc}")
        except TimeoutError as exc:
            return Outcome(False, f"timeout: {type(exc).__name__}", retry=True)
        except (OSError, http.client.HTTPException) as exc:
            return Outcome(False, f"{type(exc).__name__}: {exc}", retry=True)
        status = r.status
        if status == 401 and token and not again and self.tokens is not None:
            self.tokens.forget(token)  # revoked or expired early: one fresh token, one more try
            return self._one(op, req, again=True)
        result = _answer(r)
        if token:  # the access token is no stored secret the gateway knows: blank it here
            result = redact_tree(result, lambda text: text.replace(token, "***"))
        if 200 <= status < 300:
            replayed = r.header("Idempotent-Replayed").lower() == "true"
            return Outcome(True, f"{status}", result, duplicate=replayed, extra={"status": status})
        retry = status in RETRY_STATUSES
        return Outcome(
            False,
            f"{op.method} {path} answered {status}",
            result,
            retry=retry,
            retry_after_s=retry_after(r.header("Retry-After")) if retry else None,
            extra={"status": status},
        )

    def close(self) -> None:
        self.http.close()
        if self.tokens is not None:
            self.tokens.http.close()


_PLAIN = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"%"}


def header_value(text: str) -> str:
    """``text`` as a header value: as it is when it is printable ASCII without ``%`` (every key an
    agent derives), else percent-encoded (a key or trace that is not ASCII, holds a line break or
    spaces: no valid header as it is). One text, one value, and two texts never share one."""
    if text and set(text) <= _PLAIN:
        return text
    return urllib.parse.quote(text, safe="".join(sorted(_PLAIN)))


class _Quoted(dict[str, Any]):
    """args for a path template: each value quoted as one path segment."""

    def __getitem__(self, key: str) -> str:
        return urllib.parse.quote(str(super().__getitem__(key)), safe="")


def _answer(r: Reply) -> Any:
    if "json" in r.header("content-type"):
        try:
            doc = orjson.loads(r.body)
        except orjson.JSONDecodeError:
            return r.text[:RESULT_MAX]
        return doc if len(r.body) <= RESULT_MAX else r.text[:RESULT_MAX]
    return r.text[:RESULT_MAX]


def _open(endpoint: Endpoint, timeout_s: float, ctx: Context) -> HttpClient:
    return HttpClient(endpoint, timeout_s, ctx)


KIND = Kind("http", Endpoint, Op, idempotent=True, open=_open)
