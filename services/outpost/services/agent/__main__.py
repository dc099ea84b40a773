"""``python -m outpost.services.agent``: run the agent service with settings from the environment."""

from outpost.services.agent.service import main

main()
