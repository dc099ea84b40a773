"""Outpost's services, one folder each; every one has ``run(settings, stop)`` and a ``__main__``."""
