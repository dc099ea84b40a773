"""The simulated store API (outpost.sim.store_api): the HTTP peer the connector tests act on
behaves as they rely on: once per key, faults on command, OAuth2 tokens, down means refused."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from outpost.sim.store_api import StoreAPI

GRANT = {"grant_type": "client_credentials"}


@pytest.fixture
def api() -> Iterator[StoreAPI]:
    a = StoreAPI().start()
    yield a
    a.stop()


def test_a_key_takes_effect_once_and_its_answer_is_replayed(api: StoreAPI) -> None:
    with httpx.Client(base_url=api.url) as c:
        first = c.post("/reorders", json={"shelf": "a"}, headers={"Idempotency-Key": "k1"})
        again = c.post("/reorders", json={"shelf": "a"}, headers={"Idempotency-Key": "k1"})
        other = c.post("/tickets", json={"x": 1}, headers={"Idempotency-Key": "k2"})
        effects = c.get("/_effects").json()
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert other.status_code == 201
    assert effects["k1"]["effects"] == 1 and effects["k1"]["requests"] == 2
    assert effects["k2"]["path"] == "/tickets"


def test_faults_answer_without_effect(api: StoreAPI) -> None:
    with httpx.Client(base_url=api.url) as c:
        c.post("/_faults", json={"fail_next": 1})
        assert c.post("/notify", json={}, headers={"Idempotency-Key": "k"}).status_code == 500
        c.post("/_faults", json={"status": 429, "retry_after": 3, "count": 1})
        r = c.post("/notify", json={}, headers={"Idempotency-Key": "k"})
        assert r.status_code == 429 and r.headers["Retry-After"] == "3"
        assert "k" not in c.get("/_effects").json()
        assert c.post("/notify", json={}, headers={"Idempotency-Key": "k"}).status_code == 201
        assert c.post("/_faults", json=[1]).status_code == 400
    assert [a["status"] for a in api.arrivals()] == [500, 429, 201]


def test_oauth2_tokens_expire_and_are_revoked() -> None:
    api = StoreAPI(auth=True, client_secret="s3cret").start()
    try:
        with httpx.Client(base_url=api.url) as c:
            assert c.post("/reorders", json={}).status_code == 401
            bad = c.post("/oauth/token", data=GRANT, auth=("outpost", "x"))
            assert bad.status_code == 401
            tok = c.post(
                "/oauth/token", data={"grant_type": "client_credentials"}, auth=("outpost", "s3cret")
            )
            doc = tok.json()
            assert doc["expires_in"] == 3600
            bearer = {"Authorization": f"Bearer {doc['access_token']}"}
            assert c.post("/reorders", json={}, headers=bearer).status_code == 201
            c.post("/_faults", json={"revoke_tokens": True, "token_ttl_s": 0})
            assert c.post("/reorders", json={}, headers=bearer).status_code == 401
            tok = c.post(
                "/oauth/token", data={"grant_type": "client_credentials"}, auth=("outpost", "s3cret")
            )
            assert tok.json()["expires_in"] == 0  # issued already expired: refused at once
            bearer = {"Authorization": f"Bearer {tok.json()['access_token']}"}
            assert c.post("/reorders", json={}, headers=bearer).status_code == 401
        assert api.stats()["token_fetches"] == 2
    finally:
        api.stop()


def test_down_refuses_connections_then_comes_back_on_the_same_port(api: StoreAPI) -> None:
    port = api.port
    api.down()
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{api.url}/reorders", json={})
    api.up()
    assert api.port == port
    assert httpx.post(f"{api.url}/reorders", json={}).status_code == 201


def test_down_on_command_comes_back_after_down_s(api: StoreAPI) -> None:
    assert httpx.post(f"{api.url}/_faults", json={"down": True, "down_s": 0.5}).status_code == 200
    deadline = time.monotonic() + 10
    while api.listening and time.monotonic() < deadline:
        time.sleep(0.01)
    while not api.listening and time.monotonic() < deadline:
        time.sleep(0.01)
    assert api.listening
    assert httpx.post(f"{api.url}/notify", json={}).status_code == 201
