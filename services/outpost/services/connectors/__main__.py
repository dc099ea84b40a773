"""``python -m outpost.services.connectors``: run the connector gateway with settings from the environment."""

from outpost.services.connectors.service import main

main()
