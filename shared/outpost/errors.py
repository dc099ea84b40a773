"""One rooted exception hierarchy, so callers can catch Outpost's own failures without bare excepts."""

from __future__ import annotations


class OutpostError(Exception):
    """Base of every error Outpost raises on purpose."""


class ConfigError(OutpostError):
    """A setting, site file or CLI argument is invalid; raised at start, before anything runs."""


class TopicError(OutpostError, ValueError):
    """A topic or an identifier taken from input does not fit the topic contract."""

    def __init__(self, message: str, *, segment: str | None = None) -> None:
        super().__init__(message)
        self.segment = segment


class BrokerError(OutpostError):
    """The MQTT broker could not be started, reached or used."""
