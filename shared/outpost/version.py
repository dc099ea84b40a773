"""Outpost's version, as the installed distribution reports it (pyproject.toml's ``version``).

``outpost`` is a namespace package (PEP 420) spread over the repository's top-level folders (shared/,
services/, sim/, load-tests/), so it has no ``__init__.py`` to hold this; the service runtime puts it in
every status message.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("outpost")
except PackageNotFoundError:  # a checkout on sys.path without `pip install`
    __version__ = "0.0.0+unknown"
