"""``python -m outpost.services.ingest``: run the ingest service with settings from the environment."""

from outpost.services.ingest.service import main

main()
