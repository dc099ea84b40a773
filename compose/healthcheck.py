"""The image's HEALTHCHECK, read from the status page (the telemetry service): healthy while
/healthz answers 200 (the page runs and is connected to the broker) and every service the page
hears from is ``online`` (/api/live: each service's retained status, so one that crashed and is
being restarted by ``outpost up`` shows here until it is back). Standard library only: it runs every
few seconds and must start fast."""

import json
import os
import sys
import urllib.request

PAGE = f"http://127.0.0.1:{os.environ.get('OUTPOST_TELEMETRY__PAGE__PORT', '8787')}"


def main() -> int:
    try:
        with urllib.request.urlopen(f"{PAGE}/healthz", timeout=3) as answer:
            if answer.status != 200:
                print(f"status page: /healthz {answer.status}")
                return 1
        with urllib.request.urlopen(f"{PAGE}/api/live", timeout=3) as answer:
            live = json.load(answer)
    except (OSError, ValueError) as exc:
        print(f"status page: {exc}")
        return 1
    services = live.get("services") or []
    down = [f"{s.get('name')}: {s.get('state')}" for s in services if s.get("state") != "online"]
    if not services or down:
        print("not online: " + ("; ".join(down) or "no service reports yet"))
        return 1
    return 0


sys.exit(main())
