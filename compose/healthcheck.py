"""The image's HEALTHCHECK: healthy while the status page (the telemetry service) answers /healthz
with 200, i.e. the service runs and is connected to the broker; 503 or no answer is unhealthy.
Standard library only: it runs every few seconds and must start fast."""

import os
import sys
import urllib.request

port = os.environ.get("OUTPOST_TELEMETRY__PAGE__PORT", "8787")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except OSError as exc:
    print(f"status page: {exc}", file=sys.stderr)
    sys.exit(1)
