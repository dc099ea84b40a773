"""What the wheel and the editable install hold. ``outpost`` is a namespace package with a portion in
each of several top-level folders (pyproject.toml says which): a folder, a module or a model left
out of the build works in the checkout and is absent from the wheel (the memory service's
``embedding`` once was), so these tests build the wheel and look inside."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hatchling.builders.wheel import WheelBuilder

import outpost
from outpost.services.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
BUILD = PYPROJECT["tool"]["hatch"]["build"]
WHEEL = BUILD["targets"]["wheel"]
PORTIONS = sorted(d.name for d in ROOT.iterdir() if (d / "outpost").is_dir())
"""The repository's top-level folders that hold a portion of the namespace (shared, services, ...)."""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The names in the wheel ``pip wheel .`` builds (the same builder, in this process)."""
    out = tmp_path_factory.mktemp("wheel")
    built = list(WheelBuilder(str(ROOT)).build(directory=str(out), versions=["standard"]))
    assert len(built) == 1, built
    with zipfile.ZipFile(built[0]) as whl:
        return set(whl.namelist())


def _source_files() -> set[str]:
    """Every file git tracks in every portion (modules, models, py.typed; not the layers' ruff.toml),
    by its name in the wheel (``outpost/...``)."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--", *(f"{d}/outpost" for d in PORTIONS)],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return {path.split("/", 1)[1] for path in tracked.split("\0") if path and not path.endswith("/ruff.toml")}


def test_every_folder_with_a_portion_is_built_installed_and_type_checked() -> None:
    assert PORTIONS == ["load-tests", "services", "shared", "sim"]
    assert sorted(BUILD["dev-mode-dirs"]) == PORTIONS  # the editable install's .pth
    assert sorted(WHEEL["only-include"]) == [f"{d}/outpost" for d in PORTIONS]
    assert WHEEL["sources"] == dict.fromkeys(PORTIONS, "")
    mypy = PYPROJECT["tool"]["mypy"]
    assert sorted(mypy["mypy_path"]) == PORTIONS
    assert set(PORTIONS) | {"tests"} <= set(mypy["files"])


def test_outpost_stays_a_namespace_package() -> None:
    """An ``__init__.py`` in one ``outpost/`` folder would hide every other portion."""
    assert not [d for d in PORTIONS if (ROOT / d / "outpost" / "__init__.py").exists()]
    assert sorted(Path(p).parent.name for p in outpost.__path__) == PORTIONS


def test_the_wheel_holds_every_module_and_model(wheel: set[str]) -> None:
    files = _source_files()
    assert {n for n in files if n.endswith(".py")} - wheel == set()
    assert {n for n in files if not n.endswith(".py")} - wheel == set()
    models = [n for n in wheel if n.startswith("outpost/services/inference/models/")]
    assert {Path(n).name for n in models} == {"manifest.yaml", "model.onnx"}
    assert len(models) == 2 * len(list((ROOT / "services").rglob("models/*/*/manifest.yaml")))
    assert {"outpost/py.typed", "outpost/services/py.typed", "outpost/sim/py.typed"} <= wheel
    # the status page's files: served by the gateway itself (it works with no internet)
    page = "outpost/services/telemetry/page/static/"
    assert {page + n for n in ("index.html", "page.js", "page.css")} <= wheel
    assert {page + "vendor/" + n for n in ("uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE")} <= wheel
    assert "outpost/__init__.py" not in wheel
    assert not [n for n in wheel if n.endswith("ruff.toml")]


def test_the_editable_install_is_a_plain_pth_of_the_folders() -> None:
    """mypy and editors follow a .pth of folders; they cannot follow an import hook."""
    dist = importlib.metadata.distribution("outpost")
    if '"editable": true' not in (dist.read_text("direct_url.json") or ""):
        pytest.skip("outpost is installed from a wheel: only make deps' editable install writes the .pth")
    pth = [f for f in dist.files or [] if f.suffix == ".pth"]
    assert len(pth) == 1, pth
    lines = pth[0].read_text().splitlines()
    assert sorted(Path(line).name for line in lines) == PORTIONS
    assert all(Path(line).parent == ROOT for line in lines)  # no `import` line: no hook


def test_every_registered_service_is_a_wheel_package_that_runs(wheel: set[str]) -> None:
    """`outpost up` runs each registry row's module with ``python -m``: it must be a package of the
    wheel with a ``__main__``."""
    for row in REGISTRY:
        folder = row.module.replace(".", "/")
        assert {f"{folder}/__init__.py", f"{folder}/__main__.py"} <= wheel, row
        assert importlib.util.find_spec(f"{row.module}.__main__") is not None, row
