"""``python -m outpost.services.inference``: run the inference service with settings from the environment."""

from outpost.services.inference.service import main

main()
