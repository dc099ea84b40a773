"""``python -m outpost.services.telemetry``: run the telemetry service with settings from the environment."""

from outpost.services.telemetry.service import main

main()
