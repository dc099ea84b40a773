"""A service-shaped package for tests/integration/test_zygote.py to fork (``python -m
tests.zygote_child``, as ``outpost.services.X``): it does what ``ZYGOTE_DO`` says."""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from pathlib import Path

import orjson


def _late() -> None:
    time.sleep(0.3)
    print("thread done", flush=True)


def main() -> None:
    do = os.environ.get("ZYGOTE_DO", "report")
    if do == "report":
        print("a line of output")
        doc = {
            "env": dict(os.environ),
            "pid": os.getpid(),
            "sid": os.getsid(0),
            "title": Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode(),
            "preloaded": "tests.zygote_child" in sys.modules,
            "stdin": os.readlink("/proc/self/fd/0"),
            "argv": sys.argv,
        }
        print(orjson.dumps(doc).decode(), file=sys.stderr)
    elif do == "atexit":  # a non-daemon thread finishes and the atexit functions run, as in python
        atexit.register(lambda: print("atexit ran", flush=True))
        threading.Thread(target=_late).start()
    elif do.startswith("exit:"):
        sys.exit(int(do.removeprefix("exit:")))
    elif do == "raise":
        raise RuntimeError("this service has a bug")
    elif do == "sleep":
        print("sleeping", flush=True)
        time.sleep(300)
