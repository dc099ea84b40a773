"""``kind: http``: a SaaS or REST API over HTTP(S) with httpx.

The request's idempotency key goes in a header (``Idempotency-Key`` unless the endpoint names
another), so an endpoint that honours it carries a request out once however often it is sent. An
answer of 429 or 503 with Retry-After is tried again no sooner than it says; 408, 425, 5xx, a
timeout and a refused connection are tried again with backoff; any other 4xx is final. Auth: a
bearer token from the secret store, or OAuth2 client credentials whose token is fetched, cached and
refreshed before it expires (and once more on a 401).
"""

from __future__ import annotations

import email.utils
import threading
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any, Literal

import httpx
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


class TokenCache:
    """One OAuth2 access token, shared by the connector's calls, fetched when missing or about to
    expire; thread-safe (calls run on several worker threads)."""

    def __init__(self, auth: OAuth2, client: httpx.Client, resolve: Any) -> None:
        self.auth = auth
        self.client = client
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
        r = self.client.post(self.auth.token_url, data=data, auth=(self.auth.client_id, secret))
        if r.status_code != 200:
            raise TokenError(
                f"token endpoint answered {r.status_code}",
                r.status_code in RETRY_STATUSES or r.status_code >= 500,
            )
        doc = r.json()
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
        self.http = httpx.Client(
            base_url=endpoint.base_url,
            timeout=timeout_s,
            verify=endpoint.verify_tls,
            headers=endpoint.headers,
        )
        self.resolve = ctx.resolve
        auth = endpoint.auth
        self.tokens = TokenCache(auth, self.http, ctx.resolve) if isinstance(auth, OAuth2) else None

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
                op.method, path, headers=headers, json=req.args if op.body == "args" else None
            )
        except TokenError as exc:
            return Outcome(False, f"oauth2: {exc}", retry=exc.retry)
        except KeyError as exc:
            return Outcome(False, f"no secret {exc}")
        except httpx.TimeoutException as exc:
            return Outcome(False, f"timeout: {type(exc).__name__}", retry=True)
        except httpx.HTTPError as exc:
            return Outcome(False, f"{type(exc).__name__}: {exc}", retry=True)
        status = r.status_code
        if status == 401 and token and not again and self.tokens is not None:
            self.tokens.forget(token)  # revoked or expired early: one fresh token, one more try
            return self._one(op, req, again=True)
        result = _answer(r)
        if token:  # the access token is no stored secret the gateway knows: blank it here
            result = redact_tree(result, lambda text: text.replace(token, "***"))
        if 200 <= status < 300:
            replayed = r.headers.get("Idempotent-Replayed", "").lower() == "true"
            return Outcome(True, f"{status}", result, duplicate=replayed, extra={"status": status})
        retry = status in RETRY_STATUSES
        return Outcome(
            False,
            f"{op.method} {path} answered {status}",
            result,
            retry=retry,
            retry_after_s=retry_after(r.headers.get("Retry-After")) if retry else None,
            extra={"status": status},
        )

    def close(self) -> None:
        self.http.close()


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


def _answer(r: httpx.Response) -> Any:
    if "json" in r.headers.get("content-type", ""):
        try:
            doc = r.json()
        except ValueError:
            return r.text[:RESULT_MAX]
        text = r.text
        return doc if len(text) <= RESULT_MAX else text[:RESULT_MAX]
    return r.text[:RESULT_MAX]


def _open(endpoint: Endpoint, timeout_s: float, ctx: Context) -> HttpClient:
    return HttpClient(endpoint, timeout_s, ctx)


KIND = Kind("http", Endpoint, Op, idempotent=True, open=_open)
