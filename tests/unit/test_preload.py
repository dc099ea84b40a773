"""What the zygote imports before it forks the services (outpost.zygote, the registry's PRELOAD):
every service's module, and none of what must not be in a forked process or is only needed later.

- A GPU runtime (tensorrt, pycuda) initialised before a fork cannot be used in the child: the
  inference service imports it when it builds or loads an engine, after it is forked.
- What only some sites use, or only later, is imported at its first use, so that it is neither in
  the zygote's start nor in every site's memory: scipy (the agents' drift test), onnx (the text
  encoder's builder), influxdb-client (the telemetry writer), scikit-learn (training).
"""

from __future__ import annotations

import subprocess
import sys

import orjson

from outpost.services.registry import REGISTRY, OutpostSettings

LATER = ("tensorrt", "pycuda", "torch", "scipy", "onnx", "influxdb_client", "sklearn")


def test_the_zygote_preloads_every_service_and_nothing_that_must_wait() -> None:
    assert set(OutpostSettings.PRELOAD) == {s.name for s in REGISTRY}
    code = (
        "import importlib, sys, orjson\n"
        "from outpost.services.registry import OutpostSettings\n"
        "for m in OutpostSettings.PRELOAD.values(): importlib.import_module(m)\n"
        f"print(orjson.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({LATER!r}))).decode())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout.strip().splitlines()[-1]) == []
