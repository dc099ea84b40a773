"""The writer against a real VictoriaMetrics and against a port nobody listens on: a write that
goes through reports its bytes; an unreachable store is a WriteFailed (the service retries it
after a backoff) whose message says why and holds no token, and is chained to nothing that might.
(VictoriaMetrics takes a malformed line with a 204 and logs it, so the 400 that InfluxDB 2 answers
for one, :data:`REFUSED`, cannot be provoked here.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from outpost.broker import free_port
from outpost.services.telemetry.settings import InfluxSettings
from outpost.services.telemetry.writer import WriteFailed, Writer
from outpost.tsdb import VictoriaMetrics
from tests.conftest import wait_until

pytestmark = pytest.mark.integration

TOKEN = "tok-writer-SECRET-42"


def test_writes_and_unreachable_store_without_the_token(tmp_path: Path) -> None:
    line = "m,site=s f=1i 1700000000000000000"
    with VictoriaMetrics(tmp_path / "vm") as vm:
        w = Writer(InfluxSettings(url=vm.url, token=SecretStr(TOKEN)))
        assert w.write([line]) == len(line) + 1
        w.close()
        assert [s["values"] for s in vm.export('{__name__="m_f"}')] == [[1]]
    w = Writer(InfluxSettings(url=f"http://127.0.0.1:{free_port()}", token=SecretStr(TOKEN), timeout_s=2))
    with pytest.raises(WriteFailed) as down:
        w.write([line])
    w.close()
    assert down.value.status is None and "cannot reach" in str(down.value)
    assert TOKEN not in repr(down.value) and down.value.__cause__ is None and down.value.__suppress_context__


def test_a_server_started_to_die_with_its_parent_goes_with_a_kill_9(tmp_path: Path) -> None:
    """The demo's and the benchmark's VictoriaMetrics go when they do, even killed by SIGKILL."""
    script = (
        "import sys; from pathlib import Path; from outpost.tsdb import VictoriaMetrics; "
        f"vm = VictoriaMetrics(Path({str(tmp_path / 'vm')!r}), die_with_parent=True).start(); "
        "print(vm.proc.pid, flush=True); sys.stdin.read()"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    os.kill(pid, 0)  # running
    parent.kill()
    parent.wait()

    def gone() -> bool:
        try:  # a zombie that init has not reaped yet has stopped too
            return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        except FileNotFoundError:
            return True

    assert wait_until(gone, 15)
