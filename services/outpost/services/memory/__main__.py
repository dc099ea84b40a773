"""``python -m outpost.services.memory``: run the memory service with settings from the environment."""

from outpost.services.memory.service import main

main()
