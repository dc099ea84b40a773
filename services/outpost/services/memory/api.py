"""The memory request API, as pure logic: an operation name and a JSON body in, a JSON answer out.

The memory service serves it over MQTT 5 (``.../memory/req/{op}``, the answer on the request's
response topic with its correlation data; :mod:`.client` is the caller's side); code in the same
process can call :meth:`MemoryApi.handle` directly. Every request is checked against a strict
model (unknown fields, wrong types, huge values are refused) and every refusal is an answer with a
machine-readable ``error`` and a ``detail``, never an exception out of the handler.

Operations (body fields):

* ``context-put`` (scope, key, value, ttl_s?), ``context-get`` (scope, key), ``context-scope``
  (scope), ``context-complete`` (scope);
* ``checkpoint-save`` (task, step, state, expect?), ``checkpoint-load`` (task, version?);
* ``log-trace`` (trace, limit?): every log entry of one reading;
* ``ltm-add`` (namespace, vector or text, payload?, subject?, meta?, ttl_s?), ``ltm-search``
  (namespace, vector or text, k?, subject?, where?), ``ltm-forget-subject`` (subject): long-term
  memory. With ``text`` the service embeds it (:mod:`.embedding`); an item added by text keeps the
  text as its payload unless one is given;
* ``embed`` (texts): the vectors of up to 64 texts, for callers that keep their own index.

Every operation declares what one request may cost (:class:`Operation`: its cost in a unit, and the
most it may be): the request's bytes for the cheap ones, encoder tokens for ``embed`` (the text
encoder's time grows with them: 64 texts of 3,000 characters are 16,384 tokens, 6 s of one core
here), results for ``ltm-search``, rows for ``log-trace``, the answer's bytes for
``context-scope``. A request over its limit is refused with
``over_limit`` before any of the work is done. :attr:`MemoryApi.table` lists them (docs/memory.md).
An operation with effects (``Operation.effects``) is one the service must not run twice for a
redelivered request (it answers the copy from what it answered first).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from outpost.errors import OutpostError
from outpost.services.memory.checkpoints import CheckpointConflict, Checkpoints
from outpost.services.memory.context import ShortTermContext
from outpost.services.memory.embedding.config import EmbeddingModelError
from outpost.services.memory.embedding.embedder import TextEmbedder
from outpost.services.memory.oplog import OpLog
from outpost.services.memory.vectors import LongTermMemory
from outpost.store import DiskFull

MAX_REQUEST_BYTES = 256 * 1024
MAX_K = 100
"""Results one ``ltm-search`` may ask for: each is a payload in the answer."""
MAX_SCOPE_BYTES = 1024 * 1024
"""What one ``context-scope`` may answer (its values' JSON): a scope is a task's working set."""
MAX_TRACE_ROWS = 1000
"""Log entries one ``log-trace`` may return (one reading causes a handful)."""
DEFAULT_EMBED_TOKENS = 2048
"""Encoder tokens one request may cost (``memory.max_embed_tokens``): about 0.8 s of one core here
(docs/benchmarks.md), so a burst of them delays the requester, and the log not at all."""
Scope = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ContextPut(_Req):
    scope: Scope
    key: str = Field(min_length=1, max_length=256)
    value: Any
    ttl_s: float | None = Field(None, gt=0, le=7 * 86400)


class ContextKey(_Req):
    scope: Scope
    key: str = Field(min_length=1, max_length=256)


class ContextScope(_Req):
    scope: Scope


class CheckpointSave(_Req):
    task: str = Field(min_length=1, max_length=256)
    step: str = Field(max_length=256)
    state: Any
    expect: int | None = Field(None, ge=0)


class CheckpointLoad(_Req):
    task: str = Field(min_length=1, max_length=256)
    version: int | None = Field(None, ge=1)


Flat = str | int | float | bool
MAX_TEXT_CHARS = 10_000
"""Far past what the encoder reads (256 tokens): a longer text is a mistake, not a memory."""
Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS, pattern=r"\S")]
"""Something to embed: at least one character that is not white space."""


class _VectorOrText(_Req):
    vector: list[float] | None = Field(None, min_length=1, max_length=4096)
    text: Text | None = None

    @model_validator(mode="after")
    def _one_of(self) -> _VectorOrText:
        if (self.vector is None) == (self.text is None):
            raise ValueError("give exactly one of vector and text")
        return self


class LtmAdd(_VectorOrText):
    namespace: Scope
    payload: Any = None
    subject: str = Field("", max_length=128)
    meta: dict[str, Flat] = Field(default_factory=dict, max_length=32)
    ttl_s: float | None = Field(None, gt=0)


class LtmSearch(_VectorOrText):
    namespace: Scope
    k: int = Field(10, ge=1)
    subject: str | None = Field(None, max_length=128)
    where: dict[str, Flat] = Field(default_factory=dict, max_length=32)


class Embed(_Req):
    texts: list[Text] = Field(min_length=1, max_length=64)


class LtmForget(_Req):
    subject: str = Field(min_length=1, max_length=128)


class LogTrace(_Req):
    trace: str = Field(min_length=1, max_length=128)
    limit: int = Field(MAX_TRACE_ROWS, ge=1)


class NoEmbedderError(OutpostError):
    """A text operation on a memory that has no text encoder (not installed, or turned off)."""


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation of the API: its request model, what it does, and what one request may cost."""

    model: type[_Req]
    run: Callable[[Any], Any]
    unit: str
    """What the cost counts: "request bytes", "encoder tokens", "results", "rows"."""
    limit: int
    cost: Callable[[Any], int] | None = None
    """The request's cost in ``unit`` (None: its bytes, checked before it is parsed)."""
    effects: bool = False
    """It changes state: a redelivered copy of a request is answered, not run again."""


def _error(reason: str, detail: str) -> dict[str, Any]:
    return {"ok": False, "error": reason, "detail": detail[:1000]}


def _ok(result: Any) -> dict[str, Any]:
    return {"ok": True, "result": result}


class MemoryApi:
    def __init__(
        self,
        context: ShortTermContext,
        checkpoints: Checkpoints,
        oplog: OpLog | None,
        ltm: LongTermMemory | None = None,
        embedder: TextEmbedder | None = None,
        *,
        no_embedder: str = "this memory embeds no texts",
        max_embed_tokens: int = DEFAULT_EMBED_TOKENS,
    ) -> None:
        self.context = context
        self.checkpoints = checkpoints
        self.oplog = oplog
        self.ltm = ltm
        self.embedder = embedder
        self._no_embedder = no_embedder
        self._sqlite = threading.Lock()
        """Requests run on several worker threads: one SQLite connection serves one at a time
        (context and long-term memory lock themselves; the encoder runs outside any lock)."""
        size, byte = MAX_REQUEST_BYTES, "request bytes"
        self._ops: dict[str, Operation] = {
            "context-put": Operation(ContextPut, self._context_put, byte, size, effects=True),
            "context-get": Operation(ContextKey, lambda r: self.context.get(r.scope, r.key), byte, size),
            "context-scope": Operation(
                ContextScope,
                lambda r: self.context.scope(r.scope),
                "answer bytes",
                MAX_SCOPE_BYTES,
                lambda r: self.context.scope_bytes(r.scope),
            ),
            "context-complete": Operation(
                ContextScope, lambda r: self.context.complete(r.scope), byte, size, effects=True
            ),
            "checkpoint-save": Operation(CheckpointSave, self._checkpoint_save, byte, size, effects=True),
            "checkpoint-load": Operation(CheckpointLoad, self._checkpoint_load, byte, size),
            "log-trace": Operation(LogTrace, self._log_trace, "rows", MAX_TRACE_ROWS, lambda r: r.limit),
            "ltm-add": Operation(LtmAdd, self._ltm_add, byte, size, effects=True),
            "ltm-search": Operation(LtmSearch, self._ltm_search, "results", MAX_K, lambda r: r.k),
            "ltm-forget-subject": Operation(
                LtmForget, lambda r: self._need_ltm().delete_subject(r.subject), byte, size, effects=True
            ),
            "embed": Operation(
                Embed, self._embed, "encoder tokens", max_embed_tokens, lambda r: self._tokens(r.texts)
            ),
        }

    @property
    def operations(self) -> list[str]:
        return sorted(self._ops)

    @property
    def table(self) -> dict[str, Operation]:
        return dict(self._ops)

    def has_effects(self, op: str) -> bool:
        entry = self._ops.get(op)
        return entry is not None and entry.effects

    def handle(self, op: str, body: bytes) -> dict[str, Any]:
        """The answer to one request: ``{"ok": true, "result": ...}`` or
        ``{"ok": false, "error": reason, "detail": ...}``."""
        entry = self._ops.get(op)
        if entry is None:
            return _error("unknown_op", f"no operation {op[:64]!r}; known: {', '.join(self.operations)}")
        if len(body) > MAX_REQUEST_BYTES:
            return _error("too_large", f"{len(body)} bytes > {MAX_REQUEST_BYTES}")
        try:
            req = entry.model.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(body)"
            kind = "not_json" if first["type"] == "json_invalid" else "bad_request"
            return _error(kind, f"{where}: {first['msg']}")
        try:
            if entry.cost is not None:
                cost = entry.cost(req)
                if cost > entry.limit:
                    return _error("over_limit", f"{op}: {cost} {entry.unit} > limit {entry.limit}")
            return _ok(entry.run(req))
        except CheckpointConflict as exc:
            return _error("conflict", str(exc))
        except (NoEmbedderError, EmbeddingModelError) as exc:  # none, or it failed to load on first use
            return _error("no_embedder", str(exc))
        except DiskFull as exc:  # nothing was written: the client may try again later
            return _error("disk_full", str(exc))
        except (OutpostError, ValueError) as exc:
            return _error("bad_request", str(exc))

    def _context_put(self, r: ContextPut) -> bool:
        self.context.put(r.scope, r.key, r.value, ttl_s=r.ttl_s)
        return True

    def _checkpoint_save(self, r: CheckpointSave) -> int:
        with self._sqlite:
            return self.checkpoints.save(r.task, r.step, r.state, expect=r.expect)

    def _checkpoint_load(self, r: CheckpointLoad) -> dict[str, Any] | None:
        with self._sqlite:
            cp = self.checkpoints.load(r.task, r.version)
        if cp is None:
            return None
        return {"task": cp.task, "version": cp.version, "step": cp.step, "state": cp.state, "at_ns": cp.at_ns}

    def _need_ltm(self) -> LongTermMemory:
        if self.ltm is None:
            raise OutpostError("this memory has no long-term store")
        return self.ltm

    def _need_embedder(self) -> TextEmbedder:
        if self.embedder is None:
            raise NoEmbedderError(self._no_embedder)
        return self.embedder

    def _tokens(self, texts: list[str]) -> int:
        return self._need_embedder().tokens(texts)

    def _embed(self, r: Embed) -> list[list[float]]:
        vectors: list[list[float]] = self._need_embedder().embed(r.texts).tolist()
        return vectors

    def _vector(self, r: _VectorOrText) -> Any:
        if r.text is not None:
            return self._need_embedder().embed_one(r.text)
        return r.vector

    def _ltm_add(self, r: LtmAdd) -> int:
        ltm = self._need_ltm()
        payload = r.text if r.payload is None and r.text is not None else r.payload
        return ltm.add(r.namespace, self._vector(r), payload, subject=r.subject, meta=r.meta, ttl_s=r.ttl_s)

    def _ltm_search(self, r: LtmSearch) -> list[dict[str, Any]]:
        ltm = self._need_ltm()
        hits = ltm.search(r.namespace, self._vector(r), k=r.k, subject=r.subject, where=r.where or None)
        return [
            {
                "key": h.key,
                "score": round(h.score, 6),
                "subject": h.subject,
                "meta": h.meta,
                "payload": h.payload,
            }
            for h in hits
        ]

    def _log_trace(self, r: LogTrace) -> list[dict[str, Any]]:
        if self.oplog is None:
            raise OutpostError("this memory has no operational log")
        with self._sqlite:
            entries = self.oplog.replay(trace=r.trace, limit=r.limit)
        out = []
        for e in entries:
            try:
                body: Any = orjson.loads(e.body)
            except orjson.JSONDecodeError:
                body = e.body.decode("utf-8", "replace")
            out.append({"offset": e.offset, "ts": e.ts, "kind": e.kind, "topic": e.topic, "body": body})
        return out
