"""compose/ checked without running it: every compose file against the compose-spec JSON schema
(vendored by check-jsonschema), every Dockerfile with hadolint, and every ``OUTPOST_*`` variable,
port and volume the compose files name against the code's settings, so a renamed setting cannot
leave a deployment silently on its default."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from outpost.cli.config import reference_markdown
from outpost.services.registry import OutpostSettings

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
FILES = sorted(COMPOSE.glob("compose*.yaml"))
DOCKERFILES = sorted(COMPOSE.glob("Dockerfile*"))
BIN = Path(sys.executable).parent
_INTERPOLATED = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not in the venv: run make deps")
    return str(path)


def _load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), path
    return doc


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _resolved(value: str) -> str:
    """A value with compose's ``${VAR:-default}`` / ``${VAR:?error}`` replaced by a sample."""
    return _INTERPOLATED.sub(
        lambda m: "sample" if ":?" in m.group(0) else m.group(0).split(":-", 1)[-1][:-1], value
    )


def test_there_is_a_compose_file_and_a_dockerfile() -> None:
    assert COMPOSE / "compose.yaml" in FILES
    assert DOCKERFILES


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_compose_file_is_valid_against_the_compose_spec(path: Path) -> None:
    done = subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(path: Path) -> None:
    done = subprocess.run([_tool("hadolint"), str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_outpost_variable_in_compose_is_a_setting_and_a_valid_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    known = set(re.findall(r"\| `[^`]+` \| `(OUTPOST_[A-Z0-9_]+)` \|", reference_markdown()))
    named: dict[str, str] = {}
    for path in FILES:
        for service in (_load(path).get("services") or {}).values():
            for key, value in _environment(service).items():
                if key.startswith("OUTPOST_"):
                    named[key] = _resolved(value)
    assert named, "compose sets no OUTPOST_* variable"
    unknown = sorted(set(named) - known)
    assert not unknown, f"not settings (docs/settings.md): {unknown}"
    for key, value in named.items():
        monkeypatch.setenv(key, value)
    OutpostSettings()  # every value is one the settings accept


def test_published_ports_and_volumes_are_the_ones_outpost_uses() -> None:
    """Only the broker (plain, and TLS where its files are given: the entry script's listener) and
    the status page are published; Outpost's data folder is a named volume; a host folder is one of
    compose/ (its default) or a named volume."""
    doc = _load(COMPOSE / "compose.yaml")
    services = doc["services"]
    defaults = OutpostSettings()
    published = {
        (name, str(p).rsplit(":", 1)[-1]) for name, s in services.items() for p in s.get("ports") or []
    }
    page = ("outpost", str(defaults.telemetry.page.port))
    assert published == {("mosquitto", "1883"), ("mosquitto", "8883"), page}
    assert "listener 8883 0.0.0.0" in (COMPOSE / "mosquitto-run.sh").read_text()
    outpost = services["outpost"]
    image_env = re.findall(r"^ENV OUTPOST_DATA_DIR=(\S+)", (COMPOSE / "Dockerfile").read_text(), re.M)
    data_dir = _environment(outpost).get("OUTPOST_DATA_DIR") or image_env[0]
    mounts = {str(v).split(":", 1)[1].split(":")[0] for v in outpost.get("volumes") or []}
    assert data_dir in mounts
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name
        for volume in service.get("volumes") or []:
            source = _resolved(str(volume)).split(":", 1)[0]
            if source.startswith("."):
                assert (COMPOSE / source).is_dir(), f"{name}: {source} is not a folder of compose/"
            elif not source.startswith("/"):
                assert source in (doc.get("volumes") or {}), f"{name}: {source} is not a named volume"
