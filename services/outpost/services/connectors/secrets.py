"""Credentials, encrypted at rest with Fernet (``cryptography``): AES-128-CBC with HMAC-SHA256.

The secrets live in ``secrets.json`` in the gateway's state folder, each value a Fernet token; the
key is ``secrets.key`` beside it, created mode 0600 so that only the service's user reads it (a key
file anyone may read is refused). Connector declarations name a secret (``{secret: NAME}``), never
hold its value. ``outpost secrets set|list|rotate`` manages them: ``rotate`` makes a new key and
encrypts every value again with it (MultiFernet), so a key that leaked opens nothing written after.

A value is decrypted when a call needs it and is never logged, published, counted or put in an
exception: :meth:`SecretStore.redact` blanks every known value out of a text that came from a peer.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from outpost.errors import ConfigError

KEY_FILE = "secrets.key"
STORE_FILE = "secrets.json"
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class SecretStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.key_path = folder / KEY_FILE
        self.path = folder / STORE_FILE
        self._lock = threading.Lock()
        self._values: dict[str, str] | None = None
        self._read_at = (0, 0)

    # --- key --------------------------------------------------------------------------------------
    def _key(self, *, create: bool) -> bytes:
        if not self.key_path.exists():
            if not create:
                raise ConfigError(
                    f"no secret key at {self.key_path}: set a secret first (outpost secrets set)"
                )
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_private(self.key_path, Fernet.generate_key())
        mode = self.key_path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{self.key_path} may be read by others (mode {stat.S_IMODE(mode):o}): chmod 600 it"
            )
        return self.key_path.read_bytes().strip()

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        try:
            doc = orjson.loads(self.path.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"{self.path} is not a secrets file: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{self.path} is not a secrets file")
        return doc

    # --- operations -------------------------------------------------------------------------------
    def set(self, name: str, value: str) -> None:
        check_name(name)
        if not value:
            raise ConfigError("a secret's value may not be empty")
        with self._lock:
            f = Fernet(self._key(create=True))
            doc = self._read()
            now = time.time_ns()
            created = doc.get(name, {}).get("created_ns", now)
            doc[name] = {
                "token": f.encrypt(value.encode()).decode(),
                "created_ns": created,
                "updated_ns": now,
            }
            _write_private(self.path, orjson.dumps(doc, option=orjson.OPT_INDENT_2))
            self._values = None

    def names(self) -> dict[str, dict[str, int]]:
        """name -> {created_ns, updated_ns}: what ``outpost secrets list`` shows (never a value)."""
        return {n: {k: v for k, v in e.items() if k != "token"} for n, e in sorted(self._read().items())}

    def rotate(self) -> int:
        """A new key; every value encrypted again with it. Returns how many."""
        with self._lock:
            old = Fernet(self._key(create=False))
            new_key = Fernet.generate_key()
            both = MultiFernet([Fernet(new_key), old])
            doc = self._read()
            for entry in doc.values():
                entry["token"] = both.rotate(entry["token"].encode()).decode()
            tmp = self.key_path.with_suffix(".new")
            _write_private(tmp, new_key)
            _write_private(self.path, orjson.dumps(doc, option=orjson.OPT_INDENT_2))
            os.replace(tmp, self.key_path)
            self._values = None
            return len(doc)

    def get(self, name: str) -> str:
        """The value of ``name``; KeyError when there is none. A store changed on disk since
        (``outpost secrets set`` or ``rotate`` beside the running gateway) is read again."""
        with self._lock:
            stamp = self._stamp()
            if self._values is None or stamp != self._read_at:
                self._values = self._decrypt_all()
                self._read_at = stamp
            return self._values[name]

    def _stamp(self) -> tuple[int, int]:
        try:
            return self.path.stat().st_mtime_ns, self.key_path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0, 0

    def _decrypt_all(self) -> dict[str, str]:
        doc = self._read()
        if not doc:
            return {}
        f = Fernet(self._key(create=False))
        out: dict[str, str] = {}
        for name, entry in doc.items():
            try:
                out[name] = f.decrypt(entry["token"].encode()).decode()
            except (InvalidToken, KeyError, AttributeError):
                raise ConfigError(f"secret {name!r} cannot be decrypted with {self.key_path}") from None
        return out

    def redact(self, text: str) -> str:
        """``text`` with every secret's value blanked out (a peer may echo what it was sent)."""
        with self._lock:
            values = list((self._values or {}).values())
        for v in values:
            if v and v in text:
                text = text.replace(v, "***")
        return text


def redact_tree(value: Any, redact: Callable[[str], str]) -> Any:
    """A JSON value (a peer's answer) with ``redact`` applied to every string in it, keys too."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_tree(k, redact): redact_tree(v, redact) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_tree(v, redact) for v in value]
    return value


def check_name(name: str) -> None:
    if not name or len(name) > 64 or not set(name) <= NAME_CHARS:
        raise ConfigError(f"a secret's name is 1-64 of A-Z a-z 0-9 _ . - (got {name!r})")


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as 0600 from the start (never readable by others, not even briefly),
    atomically (a temporary file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
