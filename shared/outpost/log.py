"""Structured logging on the standard library: ``key=value`` text for people, JSON lines for machines.

Secrets never reach logs: values of keys that look secret are masked, and SecretStr prints as
``**********`` by itself.

A service under hostile input must not fill its log (a flood once wrote 62,013 tracebacks, 49.6 MB):
warnings and errors are rate-limited per kind (logger, message, exception type) by
:class:`RepeatFilter`, one line per ``every_s`` seconds; the next line of a kind says how many were
suppressed (``suppressed=N``) since the last one shown.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import orjson

_SECRET_KEYS = ("password", "secret", "token", "apikey", "api_key", "credential")
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.__dict__.items():
        if key in _RESERVED or key.startswith("_"):
            continue
        out[key] = "***" if any(s in key.lower() for s in _SECRET_KEYS) else value
    return out


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = self.formatTime(record, "%H:%M:%S")
        base = f"{when} {record.levelname:<7} {record.name}: {record.getMessage()}"
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        text = f"{base} {extra}" if extra else base
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(body, default=str).decode()


class RepeatFilter(logging.Filter):
    """Lets one WARNING-or-worse record of a kind through per ``every_s`` seconds and counts the
    rest; the next one shown carries ``suppressed`` (how many were dropped since the last shown).
    Records below WARNING pass untouched. The kinds remembered are bounded (``max_kinds``)."""

    def __init__(self, every_s: float = 10.0, max_kinds: int = 1000) -> None:
        super().__init__()
        self.every_s = every_s
        self.max_kinds = max_kinds
        self._kinds: dict[tuple[str, str, str], list[float]] = {}
        """kind -> [when last shown, suppressed since]"""
        self._lock = threading.Lock()
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        kind = (record.name, str(record.msg), exc)
        now = time.monotonic()
        with self._lock:
            seen = self._kinds.get(kind)
            if seen is not None and now - seen[0] < self.every_s:
                seen[1] += 1
                self.suppressed += 1
                return False
            if seen is None and len(self._kinds) >= self.max_kinds:
                self._kinds.clear()
            self._kinds[kind] = [now, 0]
        if seen is not None and seen[1]:
            record.suppressed = int(seen[1])
        return True


def setup_logging(level: str = "INFO", *, json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("paho").setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
