"""``kind: postgres``: a statement on a PostgreSQL database with psycopg 3.

Parameterised statements only: an operation's ``statement`` names its values as ``%(name)s``
placeholders, filled from the request's args plus ``key`` (its idempotency key) and ``trace``;
psycopg sends them apart from the SQL (the extended protocol, which also refuses a second statement
after a ``;``), so nothing a request carries is ever formatted into SQL. A statement without a
placeholder, or with any other ``%`` than ``%%``, is refused at start.

Once only: the statement is expected to carry the key into a unique constraint, e.g.
``INSERT ... VALUES (%(key)s, ...) ON CONFLICT (key) DO NOTHING``. A statement that touches no row
then means the database had already done it: the outcome is a duplicate (``on_no_rows``). Each
request runs in its own transaction (autocommit: one statement, atomic).

A refused connection, a lost one, a statement timeout, a deadlock or a serialization failure is
tried again (psycopg's OperationalError and InterfaceError); a constraint, syntax, missing table or
bad value is final (IntegrityError, ProgrammingError, DataError and the rest).
"""

from __future__ import annotations

import datetime
import decimal
import math
import re
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import Field, field_validator, model_validator

from outpost.services.connectors.kinds.base import Context, Kind, Outcome, Request, SecretRef, Strict
from outpost.services.connectors.kinds.pool import Pool

ROWS_MAX = 100
"""Rows of a RETURNING (or SELECT) kept as the result, past which they are cut."""
_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


class Endpoint(Strict):
    dsn: str | None = Field(
        None, max_length=1000, description="libpq connection string or URI (no password in it)."
    )
    host: str = "127.0.0.1"
    port: int = Field(5432, ge=1, le=65535)
    dbname: str | None = Field(None, max_length=63)
    user: str | None = Field(None, max_length=63)
    password: SecretRef | None = None
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = None
    application_name: str = Field("outpost-connectors", max_length=63)

    @field_validator("dsn")
    @classmethod
    def _no_password(cls, dsn: str | None) -> str | None:
        if dsn is None:
            return None
        try:
            parts = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError:
            raise ValueError("not a libpq connection string or URI") from None
        if parts.get("password"):
            raise ValueError("holds a password: name a secret instead (password: {secret: NAME})")
        return dsn

    @model_validator(mode="after")
    def _database(self) -> Endpoint:
        if self.dsn is None and self.dbname is None:
            raise ValueError("give dsn, or dbname (with host, port, user)")
        return self

    def conninfo(self) -> str:
        """The connection string without the password (that goes to psycopg on its own)."""
        parts: dict[str, Any] = {"application_name": self.application_name}
        if self.dsn is None:
            parts.update(host=self.host, port=self.port, dbname=self.dbname)
        if self.user is not None:
            parts["user"] = self.user
        if self.sslmode is not None:
            parts["sslmode"] = self.sslmode
        return make_conninfo(self.dsn or "", **parts)


class Op(Strict):
    statement: str = Field(
        min_length=1,
        max_length=20000,
        description="One SQL statement; values as %(name)s from args, key and trace.",
    )
    on_no_rows: Literal["duplicate", "done", "failed"] = Field(
        "duplicate",
        description="A statement that touched no row: the key's unique constraint said it was done.",
    )

    @field_validator("statement")
    @classmethod
    def _parameterised(cls, sql: str) -> str:
        names = placeholders(sql)
        if not names:
            raise ValueError("no %(name)s placeholder: parameterised statements only")
        return sql


def placeholders(sql: str) -> list[str]:
    """The ``%(name)s`` names in ``sql``; ValueError for any other ``%`` (``%s``, ``%d``, a lone
    one) than a doubled ``%%``."""
    rest = _PLACEHOLDER.sub("", sql).replace("%%", "")
    if "%" in rest:
        raise ValueError("only %(name)s placeholders (and %% for a literal %) are allowed")
    return _PLACEHOLDER.findall(sql)


def _cell(value: Any) -> Any:
    """A column value as JSON can hold it (the result goes into the outbox and the result topic)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID | datetime.timedelta):
        return str(value)
    if isinstance(value, list | tuple):
        return [_cell(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _cell(v) for k, v in value.items()}
    return str(value)


def _said(exc: BaseException) -> str:
    """The database's own message, one line (no connection string, hence no password, in it)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


class PostgresClient:
    def __init__(self, endpoint: Endpoint, timeout_s: float, ctx: Context) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.resolve = ctx.resolve
        self.pool: Pool[psycopg.Connection[Any]] = Pool(self._connect, lambda c: c.close())

    def _connect(self) -> psycopg.Connection[Any]:
        extra: dict[str, Any] = {}
        if self.endpoint.password is not None:
            extra["password"] = self.resolve(self.endpoint.password)
        ms = max(1, int(self.timeout_s * 1000))
        return psycopg.connect(
            self.endpoint.conninfo(),
            autocommit=True,
            connect_timeout=max(2, math.ceil(self.timeout_s)),
            options=f"-c statement_timeout={ms}",
            **extra,
        )

    def call(self, op: Op, requests: Sequence[Request]) -> list[Outcome]:
        return [self._one(op, r) for r in requests]

    def _one(self, op: Op, req: Request) -> Outcome:
        params = {**req.args, "key": req.key, "trace": req.trace}
        missing = [n for n in placeholders(op.statement) if n not in params]
        if missing:
            return Outcome(False, f"statement names what args lack: {', '.join(sorted(set(missing)))}")
        for _ in range(2):
            try:
                conn, reused = self.pool.take()
            except KeyError as exc:
                return Outcome(False, f"no secret {exc}")
            except psycopg.Error as exc:
                return Outcome(False, f"connect: {_said(exc)}", retry=True)
            try:
                return self._execute(conn, op, params)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self.pool.drop(conn)  # lost, or not worth keeping: the next call opens a fresh one
                if reused and conn.broken:
                    continue  # it died while idle (a database restart): once more, on a new one
                return Outcome(False, _said(exc), retry=True)
            except psycopg.Error as exc:
                if conn.closed or conn.broken:
                    self.pool.drop(conn)
                else:
                    self.pool.give(conn)
                return Outcome(False, _said(exc))
            except Exception:
                self.pool.drop(conn)
                raise
        return Outcome(False, "connection lost twice", retry=True)

    def _execute(self, conn: psycopg.Connection[Any], op: Op, params: dict[str, Any]) -> Outcome:
        with conn.cursor() as cur:
            cur.execute(op.statement, params)
            rows = cur.rowcount
            result: dict[str, Any] = {"rows": rows}
            if cur.description is not None:
                names = [c.name for c in cur.description]
                result["returned"] = [
                    {n: _cell(v) for n, v in zip(names, row, strict=True)} for row in cur.fetchmany(ROWS_MAX)
                ]
        self.pool.give(conn)
        if rows == 0 and op.on_no_rows != "done":
            if op.on_no_rows == "duplicate":
                return Outcome(True, "no row touched: already done (its key)", result, duplicate=True)
            return Outcome(False, "no row touched", result)
        return Outcome(True, f"{rows} row(s)", result)

    def close(self) -> None:
        self.pool.close()


def _open(endpoint: Endpoint, timeout_s: float, ctx: Context) -> PostgresClient:
    return PostgresClient(endpoint, timeout_s, ctx)


KIND = Kind("postgres", Endpoint, Op, idempotent=True, open=_open)
