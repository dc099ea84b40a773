"""Ingest: raw device readings in, validated and normalized events out, everything else dead-lettered."""

from outpost.services.ingest.service import IngestService, run

__all__ = ["IngestService", "run"]
