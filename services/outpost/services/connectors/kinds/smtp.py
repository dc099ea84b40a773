"""``kind: smtp``: mail to customers and staff with smtplib.

A call is one SMTP session (connect, STARTTLS where asked, login, then every message, then QUIT):
a capability that batches (``batch: {max: 50}``) sends a batch of requests over one connection for
one call's cost. A request whose args hold ``items`` (an agent's batched action, ``{items: [...],
count}``) sends one message per item, each item's fields filling the templates (over the request's
own args).

Not idempotent: SMTP has no idempotency key, so a request caught mid-call by a crash or a lost
connection is sent again. Its ``Message-ID`` is derived from the request's key (and the item's
place), so a receiver, or a mail store, can drop the copy by Message-ID.

A refused or lost connection, a timeout and a 4xx answer are tried again; a recipient the server
refuses (5xx), a template that names what the args lack, a bad address, a failed login, no
STARTTLS where it is asked for and a certificate that does not verify are final. A request whose
recipients are refused fails on its own: the rest of the batch goes on.
"""

from __future__ import annotations

import email.utils
import re
import smtplib
import ssl
from collections.abc import Sequence
from email.message import EmailMessage
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from outpost.contracts import derived_id
from outpost.services.connectors.kinds import template
from outpost.services.connectors.kinds.base import Context, Kind, Outcome, Request, SecretRef, Strict

MESSAGE_ID_DOMAIN = "outpost"
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class Endpoint(Strict):
    host: str = "127.0.0.1"
    port: int = Field(25, ge=1, le=65535)
    starttls: bool = Field(False, description="Upgrade the connection with STARTTLS before login.")
    verify_tls: bool = True
    user: str | None = Field(None, max_length=255)
    password: SecretRef | None = None
    local_hostname: str | None = Field(None, max_length=255, description="Sent with EHLO.")

    @model_validator(mode="after")
    def _login(self) -> Endpoint:
        if (self.user is None) != (self.password is None):
            raise ValueError("user and password go together (login), or neither")
        return self


class Op(Strict):
    from_: str = Field(alias="from", min_length=3, max_length=320, description="The sender's address.")
    to: str = Field(min_length=1, max_length=1000, description="Recipients, comma-separated; {field}.")
    subject: str = Field(max_length=1000, description="{field} is the args' value.")
    body: str = Field(max_length=100_000, description="Plain text; {field} is the args' value.")
    subtype: Literal["plain", "html"] = "plain"
    reply_to: str | None = Field(None, max_length=320)

    _templates = field_validator("to", "subject", "body")(template.check)

    @field_validator("from_", "reply_to")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and "@" not in email.utils.parseaddr(value)[1]:
            raise ValueError(f"not a mail address: {value!r}")
        return value


def message_id(key: str, part: int | None = None) -> str:
    """The Message-ID of a request's message (its ``part``-th, for a request with items): the same
    key, the same id, so a copy sent again is recognisably the same message."""
    local = key if _PLAIN_KEY.match(key) else derived_id(key)  # a key with <, @ or a space: hashed
    if part is not None:
        local = f"{local}.{part}"
    return f"<{local}@{MESSAGE_ID_DOMAIN}>"


class _BadMessageError(Exception):
    """A message that cannot be built from the request (a final failure)."""


def _messages(op: Op, req: Request) -> list[tuple[EmailMessage, list[str]]]:
    items = req.args.get("items")
    if isinstance(items, list):
        base = {k: v for k, v in req.args.items() if k not in ("items", "count")}
        parts: list[tuple[int | None, dict[str, Any]]] = [
            (i, {**base, **(item if isinstance(item, dict) else {"item": item})})
            for i, item in enumerate(items)
        ]
    else:
        parts = [(None, req.args)]
    out: list[tuple[EmailMessage, list[str]]] = []
    for part, args in parts:
        try:
            to = template.fill(op.to, args)
            subject = template.fill(op.subject, args)
            body = template.fill(op.body, args)
        except template.MissingFieldError as exc:
            raise _BadMessageError(f"a template names what args lack: {exc}") from None
        rcpts = [addr for _name, addr in email.utils.getaddresses([to]) if addr]
        if not rcpts or any("@" not in a for a in rcpts):
            raise _BadMessageError(f"no mail address in {to!r}"[:300])
        msg = EmailMessage()
        try:
            msg["From"] = op.from_
            msg["To"] = to
            msg["Subject"] = subject
            if op.reply_to:
                msg["Reply-To"] = op.reply_to
            msg["Message-ID"] = message_id(req.key, part)
            msg["Date"] = email.utils.formatdate(localtime=False)
            msg["X-Outpost-Trace"] = req.trace
            msg.set_content(body, subtype=op.subtype)
        except ValueError as exc:  # a line break in a header: header injection, refused
            raise _BadMessageError(f"bad message: {exc}"[:300]) from None
        out.append((msg, rcpts))
    return out


def _smtp_error(exc: smtplib.SMTPResponseException) -> str:
    said = (
        exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
    )
    return f"{exc.smtp_code} {said}"[:500]


class SmtpClient:
    def __init__(self, endpoint: Endpoint, timeout_s: float, ctx: Context) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.resolve = ctx.resolve

    def _session(self) -> smtplib.SMTP:
        e = self.endpoint
        smtp = smtplib.SMTP(e.host, e.port, local_hostname=e.local_hostname, timeout=self.timeout_s)
        try:
            if e.starttls:
                context = ssl.create_default_context()
                if not e.verify_tls:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                smtp.starttls(context=context)
            if e.user is not None and e.password is not None:
                smtp.login(e.user, self.resolve(e.password))
        except BaseException:
            smtp.close()
            raise
        return smtp

    def call(self, op: Op, requests: Sequence[Request]) -> list[Outcome]:
        built: list[list[tuple[EmailMessage, list[str]]] | Outcome] = []
        for req in requests:
            try:
                built.append(_messages(op, req))
            except _BadMessageError as exc:
                built.append(Outcome(False, str(exc)))
        if all(isinstance(b, Outcome) for b in built):
            return [b for b in built if isinstance(b, Outcome)]
        try:
            smtp = self._session()
        except KeyError as exc:
            return [b if isinstance(b, Outcome) else Outcome(False, f"no secret {exc}") for b in built]
        except smtplib.SMTPAuthenticationError as exc:
            why = f"login refused: {_smtp_error(exc)}"
            return [b if isinstance(b, Outcome) else Outcome(False, why) for b in built]
        except (smtplib.SMTPNotSupportedError, ssl.SSLCertVerificationError) as exc:
            why = f"connect: {type(exc).__name__}: {exc}"[:500]  # STARTTLS not offered, a bad certificate
            return [b if isinstance(b, Outcome) else Outcome(False, why) for b in built]
        except smtplib.SMTPResponseException as exc:
            why, retry = f"connect: {_smtp_error(exc)}", 400 <= exc.smtp_code < 500 or exc.smtp_code == -1
            return [b if isinstance(b, Outcome) else Outcome(False, why, retry=retry) for b in built]
        except (smtplib.SMTPException, OSError) as exc:
            why = f"connect: {type(exc).__name__}: {exc}"[:500]
            return [b if isinstance(b, Outcome) else Outcome(False, why, retry=True) for b in built]
        out: list[Outcome] = []
        lost: str | None = None
        try:
            for b in built:
                if isinstance(b, Outcome):
                    out.append(b)
                elif lost is not None:
                    out.append(Outcome(False, lost, retry=True))
                else:
                    o = self._send(smtp, b)
                    if o.retry and o.extra.get("lost"):
                        lost = o.detail
                    out.append(o)
        finally:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                smtp.close()
        return out

    def _send(self, smtp: smtplib.SMTP, messages: list[tuple[EmailMessage, list[str]]]) -> Outcome:
        """One request's messages; a refusal of all its recipients, a 5xx or a 4xx ends it."""
        ids: list[str] = []
        for msg, rcpts in messages:
            try:
                refused = smtp.send_message(msg, to_addrs=rcpts)
            except smtplib.SMTPRecipientsRefused as exc:
                codes = [code for code, _ in exc.recipients.values()]
                return Outcome(
                    False,
                    f"recipients refused: {', '.join(str(c) for c in codes)}",
                    {"sent": ids},
                    retry=all(400 <= c < 500 for c in codes),
                )
            except smtplib.SMTPServerDisconnected as exc:
                return Outcome(
                    False, f"connection lost: {exc}"[:500], {"sent": ids}, retry=True, extra={"lost": 1}
                )
            except smtplib.SMTPResponseException as exc:
                retry = 400 <= exc.smtp_code < 500
                return Outcome(False, _smtp_error(exc), {"sent": ids}, retry=retry)
            except (smtplib.SMTPException, OSError) as exc:
                return Outcome(
                    False, f"{type(exc).__name__}: {exc}"[:500], {"sent": ids}, retry=True, extra={"lost": 1}
                )
            if refused:
                codes = [code for code, _ in refused.values()]
                return Outcome(
                    False,
                    f"{len(refused)} of {len(rcpts)} recipients refused: {', '.join(str(c) for c in codes)}",
                    {"sent": ids},
                )
            ids.append(str(msg["Message-ID"]))
        return Outcome(True, f"{len(ids)} sent", {"sent": ids})

    def close(self) -> None:
        """Nothing held between calls: each call is its own SMTP session."""


def _open(endpoint: Endpoint, timeout_s: float, ctx: Context) -> SmtpClient:
    return SmtpClient(endpoint, timeout_s, ctx)


KIND = Kind("smtp", Endpoint, Op, idempotent=False, open=_open, batches=True)
