"""``python -m outpost.services.uplink``: run the uplink service with settings from the environment."""

from outpost.services.uplink.service import main

main()
