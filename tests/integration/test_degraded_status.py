"""A service that runs on without part of its job says so: its retained status turns
``health: degraded`` with the problems, and ``ok`` once they are gone, against a real Mosquitto."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from outpost.services.inference.registry import PACKAGED_MODELS
from outpost.services.inference.service import run as run_inference
from outpost.services.memory.service import run as run_memory
from outpost.services.registry import OutpostSettings
from tests.conftest import Collector, ServiceThread

pytestmark = pytest.mark.integration


def latest(c: Collector) -> dict[str, Any]:
    docs = c.json()
    return docs[-1] if docs else {}


def test_inference_without_a_backend_that_runs_is_degraded(settings: OutpostSettings, tmp_path: Path) -> None:
    shutil.copytree(PACKAGED_MODELS, tmp_path / "models")
    settings.inference.models_dir = tmp_path / "models"
    settings.inference.reload_s = 0.1
    # asked for CUDA on a machine without it: an error, never a silent fallback to the CPU
    settings.inference.backend = {"type": "onnxruntime", "providers": ["cuda"]}  # type: ignore[assignment]
    status = Collector(settings.mqtt, settings.topics.service_status("inference"), client_id="st-inf").start()
    svc = ServiceThread(run_inference, settings).start()
    try:
        assert status.wait_for(lambda c: latest(c).get("health") == "degraded")
        doc = latest(status)
        assert doc["state"] == "online"
        assert {p.split(":")[0] for p in doc["problems"]} == {"fridge-anomaly", "shelf-stock"}
        assert all("nothing serves it" in p and "not ['cuda']" in p for p in doc["problems"]), doc["problems"]
    finally:
        svc.stop()
    assert latest(status)["state"] == "stopped"
    status.stop()


def test_memory_without_its_text_encoder_is_degraded_and_serves_the_rest(
    settings: OutpostSettings, tmp_path: Path
) -> None:
    settings.memory.embedder_dir = str(tmp_path / "no-model-here")
    status = Collector(settings.mqtt, settings.topics.service_status("memory"), client_id="st-mem").start()
    svc = ServiceThread(run_memory, settings).start()
    try:
        assert status.wait_for(lambda c: latest(c).get("state") == "online")
        doc = latest(status)
        assert doc["health"] == "degraded" and "no such model folder" in doc["problems"][0]
        from outpost.services.memory.client import MemoryClient, MemoryRequestError

        with MemoryClient(settings, "probe") as mem:
            assert mem.request("context-put", {"scope": "s", "key": "k", "value": 1}) is True
            with pytest.raises(MemoryRequestError) as e:
                mem.request("ltm-search", {"namespace": "n", "text": "hello"})
            assert e.value.reason == "no_embedder" and "no such model folder" in e.value.detail
    finally:
        svc.stop()
    status.stop()


def test_a_healthy_service_says_ok(settings: OutpostSettings) -> None:
    status = Collector(settings.mqtt, settings.topics.service_status("memory"), client_id="st-ok").start()
    svc = ServiceThread(run_memory, settings).start()
    try:
        assert status.wait_for(lambda c: latest(c).get("state") == "online")
        assert latest(status)["health"] == "ok" and latest(status)["problems"] == []
    finally:
        svc.stop()
    status.stop()
