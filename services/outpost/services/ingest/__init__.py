"""Ingest: raw device readings in, validated and normalized events out, everything else dead-lettered.

Kept free of imports: the service registry imports this package's settings, and the service imports
the registry (:mod:`outpost.services.ingest.service` has ``IngestService`` and ``run``)."""
