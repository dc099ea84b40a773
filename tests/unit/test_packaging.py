"""Every Python package folder goes into a built wheel: the editable install finds any folder
through ``package-dir``, so a package missing from pyproject's list works in the checkout and is
absent from the wheel (the memory service's ``embedding`` once was)."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

from outpost.services.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_in_pyproject() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {folder: name for name, folder in cfg["package-dir"].items()}
    found = set()
    for folder, name in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found == set(cfg["packages"])


def test_every_registered_service_is_a_listed_package_that_runs() -> None:
    """`outpost up` runs each registry row's module with ``python -m``: it must be a package of the
    wheel with a ``__main__``."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for row in REGISTRY:
        assert row.module in cfg["packages"], row
        assert importlib.util.find_spec(f"{row.module}.__main__") is not None, row
