"""The memory request API as pure logic: every operation, and every bad request answered with a
reason instead of an exception."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import orjson
import pytest

from outpost.services.memory.api import MemoryApi
from outpost.services.memory.checkpoints import Checkpoints
from outpost.services.memory.context import ShortTermContext
from outpost.services.memory.oplog import OpLog, Record
from outpost.services.memory.vectors import LongTermMemory


@pytest.fixture
def api(tmp_path: Path) -> MemoryApi:
    log = OpLog(tmp_path / "log.db")
    log.append([Record(1, "event", "T1", "t", b'{"id":"T1"}'), Record(2, "score", "T1", "t", b"[1]")])
    return MemoryApi(
        ShortTermContext(), Checkpoints(tmp_path / "cp.db"), log, LongTermMemory(tmp_path / "ltm", dim=4)
    )


def call(api: MemoryApi, op: str, body: object) -> dict[str, object]:
    return api.handle(op, body if isinstance(body, bytes) else orjson.dumps(body))


def rows(api: MemoryApi, op: str, body: object) -> list[dict[str, Any]]:
    """``call``'s result, for the operations that answer a list of objects."""
    return cast("list[dict[str, Any]]", call(api, op, body)["result"])


def test_every_operation(api: MemoryApi) -> None:
    assert call(api, "context-put", {"scope": "task-1", "key": "k", "value": [1, 2]}) == {
        "ok": True,
        "result": True,
    }
    assert call(api, "context-get", {"scope": "task-1", "key": "k"})["result"] == [1, 2]
    assert call(api, "context-scope", {"scope": "task-1"})["result"] == {"k": [1, 2]}
    assert call(api, "context-complete", {"scope": "task-1"})["result"] == 1
    assert call(api, "context-get", {"scope": "task-1", "key": "k"})["result"] is None
    assert (
        call(api, "checkpoint-save", {"task": "t", "step": "a", "state": {"n": 1}, "expect": 0})["result"]
        == 1
    )
    assert call(api, "checkpoint-load", {"task": "t"})["result"]["state"] == {"n": 1}  # type: ignore[index]
    assert call(api, "checkpoint-load", {"task": "none"})["result"] is None
    assert [e["kind"] for e in rows(api, "log-trace", {"trace": "T1"})] == ["event", "score"]
    add = {
        "namespace": "notes",
        "vector": [1, 0, 0, 0],
        "payload": {"n": 1},
        "subject": "alice",
        "meta": {"x": 1},
    }
    assert call(api, "ltm-add", add)["ok"] is True
    call(api, "ltm-add", {**add, "vector": [0, 1, 0, 0], "payload": {"n": 2}, "subject": "bob"})
    hits = rows(api, "ltm-search", {"namespace": "notes", "vector": [1, 0.1, 0, 0], "k": 2})
    assert [h["payload"]["n"] for h in hits] == [1, 2]
    assert call(api, "ltm-forget-subject", {"subject": "alice"})["result"] == 1
    hits = rows(api, "ltm-search", {"namespace": "notes", "vector": [1, 0, 0, 0], "where": {"x": 1}})
    assert [h["payload"]["n"] for h in hits] == [2]


@pytest.mark.parametrize(
    ("op", "body", "error"),
    [
        ("nope", {}, "unknown_op"),
        ("context-get", b"{not json", "not_json"),
        ("context-get", b"[1,2]", "bad_request"),
        ("context-get", {"scope": "task-1"}, "bad_request"),  # missing key
        ("context-get", {"scope": "a/b", "key": "k"}, "bad_request"),  # a topic separator
        ("context-get", {"scope": "+", "key": "k"}, "bad_request"),  # a wildcard
        ("context-get", {"scope": "s", "key": "k", "extra": 1}, "bad_request"),
        ("context-put", {"scope": "s", "key": "k", "value": 1, "ttl_s": "10"}, "bad_request"),  # wrong type
        ("context-put", {"scope": "s", "key": "k", "value": 1, "ttl_s": -1}, "bad_request"),
        ("context-put", {"scope": "s", "key": "k", "value": "x" * 100_000}, "bad_request"),  # over 64 KB
        ("context-put", b'{"scope":"s","key":"k","value":' + b'"' + b"x" * 300_000 + b'"}', "too_large"),
        ("checkpoint-save", {"task": "t", "step": "a", "state": 1, "expect": 5}, "conflict"),
        ("checkpoint-save", {"task": "", "step": "a", "state": 1}, "bad_request"),
        ("checkpoint-load", {"task": "t", "version": 0}, "bad_request"),
        ("log-trace", {"trace": "T1", "limit": 10**9}, "over_limit"),
        ("log-trace", {"trace": "T1", "limit": 1001}, "over_limit"),
        ("log-trace", {"trace": "T1", "limit": 0}, "bad_request"),
        ("ltm-search", {"namespace": "n", "vector": [1, 0, 0, 0], "k": 101}, "over_limit"),
        ("ltm-add", {"namespace": "n", "vector": [1, 2], "payload": 1}, "bad_request"),  # wrong dimension
        ("ltm-add", {"namespace": "n", "vector": [0, 0, 0, 0], "payload": 1}, "bad_request"),
        ("ltm-add", {"namespace": "n", "vector": ["a", 1, 1, 1], "payload": 1}, "bad_request"),
        ("ltm-search", {"namespace": "n", "vector": [1, 0, 0, 0], "k": 0}, "bad_request"),
        ("ltm-forget-subject", {"subject": ""}, "bad_request"),
        # text or vector, exactly one; this memory has no text encoder
        ("ltm-add", {"namespace": "n", "payload": 1}, "bad_request"),
        ("ltm-add", {"namespace": "n", "vector": [1, 0, 0, 0], "text": "hi", "payload": 1}, "bad_request"),
        ("ltm-add", {"namespace": "n", "text": ""}, "bad_request"),
        ("ltm-add", {"namespace": "n", "text": " \n\t "}, "bad_request"),  # nothing to embed
        ("ltm-add", {"namespace": "n", "text": "x" * 10_001}, "bad_request"),
        ("ltm-add", {"namespace": "n", "text": 42}, "bad_request"),
        ("ltm-add", {"namespace": "n", "text": "door left open"}, "no_embedder"),
        ("ltm-search", {"namespace": "n", "text": "door"}, "no_embedder"),
        ("embed", {"texts": ["a"]}, "no_embedder"),
        ("embed", {"texts": []}, "bad_request"),
        ("embed", {"texts": ["a"] * 65}, "bad_request"),
        ("embed", {"texts": "a"}, "bad_request"),
    ],
)
def test_bad_requests_get_a_reason(api: MemoryApi, op: str, body: object, error: str) -> None:
    answer = call(api, op, body)
    assert answer["ok"] is False and answer["error"] == error and answer["detail"], answer


def test_every_operation_declares_its_cost_limit(api: MemoryApi) -> None:
    table = api.table
    assert sorted(table) == api.operations
    for name, op in table.items():
        assert op.limit > 0 and op.unit, name
    assert table["embed"].unit == "encoder tokens" and table["embed"].cost is not None
    assert {n for n, op in table.items() if op.effects} == {
        "context-put",
        "context-complete",
        "checkpoint-save",
        "ltm-add",
        "ltm-forget-subject",
    }


def test_a_scope_too_large_to_answer_is_refused(api: MemoryApi) -> None:
    for i in range(20):
        assert call(api, "context-put", {"scope": "big", "key": f"k{i}", "value": "x" * 60_000})["ok"]
    answer = call(api, "context-scope", {"scope": "big"})
    assert answer["error"] == "over_limit" and "answer bytes > limit 1048576" in str(answer["detail"])
    assert call(api, "context-complete", {"scope": "big"})["result"] == 20


def test_a_request_at_its_limit_runs_and_one_past_it_is_refused_with_the_figures(api: MemoryApi) -> None:
    assert call(api, "ltm-search", {"namespace": "n", "vector": [1, 0, 0, 0], "k": 100})["ok"] is True
    answer = call(api, "ltm-search", {"namespace": "n", "vector": [1, 0, 0, 0], "k": 101})
    assert answer == {"ok": False, "error": "over_limit", "detail": "ltm-search: 101 results > limit 100"}
