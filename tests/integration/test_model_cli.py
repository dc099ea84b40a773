"""``outpost model`` as an operator runs it: list, verify, activate, shadow, rollback, quantize, and
clear errors (exit code 2, no traceback) for unknown names, corrupt files and bad arguments."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from outpost.datadir import site_path
from outpost.services.inference.registry import PACKAGED_MODELS, Registry
from tests.conftest import outpost

pytestmark = pytest.mark.integration


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    models = tmp_path / "models"
    shutil.copytree(PACKAGED_MODELS, models)
    e = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
    e.update(OUTPOST_DATA_DIR=str(tmp_path / "data"), OUTPOST_INFERENCE__MODELS_DIR=str(models))
    registry(e).close()  # the site has run once: its registry state is there
    return e


def model(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return outpost("model", *args, env=env)


def registry(env: dict[str, str]) -> Registry:
    return Registry(
        Path(env["OUTPOST_INFERENCE__MODELS_DIR"]),
        state_path(env),
    )


def state_path(env: dict[str, str]) -> Path:
    """The registry state of the default site, the one `outpost model` finds without --site."""
    return site_path(Path(env["OUTPOST_DATA_DIR"]), "site1", "inference", "registry.db")


def listed(env: dict[str, str]) -> list[dict[str, object]]:
    p = model(env, "list", "--json")
    assert p.returncode == 0, p.stderr
    rows: list[dict[str, object]] = orjson.loads(p.stdout.strip().splitlines()[-1])["models"]
    return rows


def test_list_verify_activate_shadow_rollback(env: dict[str, str]) -> None:
    rows = listed(env)
    assert {(r["name"], r["version"]) for r in rows} >= {
        ("fridge-anomaly", "1.0.0"),
        ("fridge-anomaly", "1.1.0"),
        ("shelf-stock", "1.0.0"),
    }
    # by default the newest release is active
    assert {(r["name"], r["version"]) for r in rows if r["active"]} == {
        ("fridge-anomaly", "1.1.0"),
        ("shelf-stock", "1.0.0"),
    }
    p = model(env, "verify", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    assert orjson.loads(p.stdout.strip().splitlines()[-1])["ok"] is True

    assert model(env, "activate", "fridge-anomaly", "1.0.0").returncode == 0
    assert model(env, "shadow", "fridge-anomaly", "1.1.0").returncode == 0
    state = registry(env).state("fridge-anomaly")
    assert (state.active, state.shadow) == ("1.0.0", "1.1.0")
    # a shadow must differ from the active version
    p = model(env, "shadow", "fridge-anomaly", "1.0.0")
    assert p.returncode == 2 and "active version" in p.stderr
    assert model(env, "activate", "fridge-anomaly", "1.1.0").returncode == 0
    state = registry(env).state("fridge-anomaly")
    assert (state.active, state.shadow) == ("1.1.0", None)  # the shadow became the active one
    p = model(env, "rollback", "fridge-anomaly")
    assert p.returncode == 0 and "1.1.0 -> 1.0.0" in p.stdout
    assert registry(env).state("fridge-anomaly").active == "1.0.0"
    assert model(env, "shadow", "fridge-anomaly", "--off").returncode == 0


def test_rollback_returns_to_the_default_that_was_active(env: dict[str, str]) -> None:
    # nothing chosen yet: 1.1.0 is active as the newest release; activating 1.0.0 and rolling
    # back must return to 1.1.0, though no operator ever activated it
    assert model(env, "activate", "fridge-anomaly", "1.0.0").returncode == 0
    p = model(env, "rollback", "fridge-anomaly")
    assert p.returncode == 0 and "1.0.0 -> 1.1.0" in p.stdout, p.stdout + p.stderr
    # a second rollback toggles back
    p = model(env, "rollback", "fridge-anomaly")
    assert p.returncode == 0 and "1.1.0 -> 1.0.0" in p.stdout
    # a version that failed is skipped
    registry(env).mark_bad("fridge-anomaly", "1.1.0", "test")
    p = model(env, "rollback", "fridge-anomaly")
    assert p.returncode == 2 and "no earlier good version" in p.stderr


def test_corrupt_file_is_refused_and_reported(env: dict[str, str]) -> None:
    path = Path(env["OUTPOST_INFERENCE__MODELS_DIR"]) / "fridge-anomaly" / "1.0.0" / "model.onnx"
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    p = model(env, "activate", "fridge-anomaly", "1.0.0")
    assert p.returncode == 2 and "checksum mismatch" in p.stderr and "Traceback" not in p.stderr
    assert registry(env).state("fridge-anomaly").active == "1.1.0"
    p = model(env, "verify", "fridge-anomaly")
    assert p.returncode == 2
    assert "FAILED fridge-anomaly@1.0.0" in p.stdout and "ok fridge-anomaly@1.1.0" in p.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("activate", "no-such-model", "1.0.0"), "no model 'no-such-model'"),
        (("activate", "shelf-stock", "7.7.7"), "no version '7.7.7'"),
        (("rollback", "shelf-stock"), "no earlier good version"),
        (("shadow", "shelf-stock"), "give a VERSION"),
        (("activate", "../../etc", "1.0.0"), "no model"),
        (("quantize", "shelf-stock", "1.0.0-int8"), "no version"),
    ],
)
def test_bad_arguments_are_clear_errors(env: dict[str, str], args: tuple[str, ...], message: str) -> None:
    p = model(env, *args)
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr


def test_a_broken_manifest_is_listed_not_fatal(env: dict[str, str]) -> None:
    folder = Path(env["OUTPOST_INFERENCE__MODELS_DIR"]) / "shelf-stock" / "2.0.0"
    folder.mkdir()
    (folder / "manifest.yaml").write_text("name: shelf-stock\nversion: [oops\n")
    rows = {(r["name"], r["version"]): r for r in listed(env)}
    assert "unreadable" in str(rows[("shelf-stock", "2.0.0")]["description"])
    p = model(env, "activate", "shelf-stock", "2.0.0")
    assert p.returncode == 2 and "cannot read manifest" in p.stderr


def test_quantize_reports_size_latency_and_accuracy(env: dict[str, str]) -> None:
    p = model(env, "quantize", "shelf-stock", "1.0.0", "--json")
    assert p.returncode == 0, p.stderr
    # its progress is on stderr, one line a step (not a terminal: no drawing); stdout is the JSON
    assert p.stdout.count("\n") == 1
    steps = p.stderr.strip().splitlines()
    assert steps[0].startswith("loading the quantizer") and steps[-1] == "latency of INT8, batch 256"
    r = orjson.loads(p.stdout.strip().splitlines()[-1])
    assert r["result"] == "shelf-stock@1.0.0-int8"
    assert r["int8_bytes"] < r["float_bytes"]
    assert set(r["float_us_per_batch"]) == set(r["int8_us_per_batch"]) == {"1", "32", "256"}
    assert r["held_out_rows"] > 1000
    assert abs(r["accuracy_change"]) < 0.05 and r["label_agreement"] > 0.95
    # a new version beside the float one, verified, never the default
    assert model(env, "verify", "shelf-stock", "1.0.0-int8").returncode == 0
    assert registry(env).state("shelf-stock").active == "1.0.0"
    again = model(env, "quantize", "shelf-stock", "1.0.0")
    assert again.returncode == 2 and "exists already" in again.stderr
    # on a terminal (rich forced to draw) the bar is drawn on stderr, never on stdout
    drawn = outpost(
        "model", "quantize", "shelf-stock", "1.0.0", "--overwrite", "--json", env={**env, "FORCE_COLOR": "1"}
    )
    assert drawn.returncode == 0, drawn.stderr
    assert drawn.stdout.count("\n") == 1 and "\x1b" not in drawn.stdout
    assert orjson.loads(drawn.stdout)["result"] == "shelf-stock@1.0.0-int8"
    assert "\x1b[" in drawn.stderr and "/10" in drawn.stderr and "latency of INT8, batch 256" in drawn.stderr


def test_unusable_state_and_oversized_manifest_are_clear_errors(env: dict[str, str]) -> None:
    folder = Path(env["OUTPOST_INFERENCE__MODELS_DIR"]) / "shelf-stock" / "3.0.0"
    folder.mkdir()
    (folder / "manifest.yaml").write_text("a: &a [" + "x, " * 200_000 + "]\n")
    p = model(env, "verify", "shelf-stock", "3.0.0")
    assert p.returncode == 2 and "larger than" in p.stdout
    state = state_path(env)
    for f in state.parent.glob("registry.db*"):
        f.unlink()
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_bytes(b"this is not a database" * 100)
    p = model(env, "list")
    assert p.returncode == 2 and "move it aside" in p.stderr and "Traceback" not in p.stderr
    # the service itself says the same and exits 2 (the supervisor shows it restarting)
    svc = subprocess.run(
        [sys.executable, "-m", "outpost.services.inference"],
        env={**env, "OUTPOST_MQTT__PORT": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert svc.returncode == 2 and "move it aside" in svc.stderr and "Traceback" not in svc.stderr


def test_activate_refuses_a_file_that_does_not_load_even_with_the_right_checksum(env: dict[str, str]) -> None:
    from outpost.services.inference.manifest import read_manifest, sha256_of, write_manifest

    models = Path(env["OUTPOST_INFERENCE__MODELS_DIR"])
    src, dst = models / "fridge-anomaly" / "1.0.0", models / "fridge-anomaly" / "0.9.0"
    shutil.copytree(src, dst)
    (dst / "model.onnx").write_bytes(os.urandom(4096))
    m = read_manifest(src)
    write_manifest(dst, m.model_copy(update={"version": "0.9.0", "sha256": sha256_of(dst / "model.onnx")}))
    for args in (("activate", "fridge-anomaly", "0.9.0"), ("shadow", "fridge-anomaly", "0.9.0")):
        p = model(env, *args)
        assert p.returncode == 2 and "cannot load" in p.stderr and "Traceback" not in p.stderr, p.stderr
    state = registry(env).state("fridge-anomaly")
    assert (state.active, state.explicit, state.shadow) == ("1.1.0", False, None)  # nothing was written


def test_unknown_model_names_in_the_settings_stop_the_service_with_a_clear_error(env: dict[str, str]) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "outpost.services.inference"],
        env={**env, "OUTPOST_INFERENCE__MODELS": '["nope"]', "OUTPOST_MQTT__PORT": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 2 and "inference.models names ['nope']" in p.stderr and "Traceback" not in p.stderr


def test_the_list_at_80_columns_keeps_name_version_and_role(env: dict[str, str]) -> None:
    p = outpost("model", "list", env={**env, "COLUMNS": "80"})
    assert p.returncode == 0, p.stderr
    assert max(len(line) for line in p.stdout.splitlines()) <= 80, p.stdout
    rows = [line for line in p.stdout.splitlines() if "shelf-stock" in line]
    assert any("1.0.0" in row and "active" in row for row in rows), p.stdout
