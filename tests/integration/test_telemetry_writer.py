"""The writer against a real VictoriaMetrics and against a port nobody listens on: a write that
goes through reports its bytes; an unreachable store is a WriteFailed (the service retries it
after a backoff) whose message says why and holds no token, and is chained to nothing that might.
(VictoriaMetrics takes a malformed line with a 204 and logs it, so the 400 that InfluxDB 2 answers
for one, :data:`REFUSED`, cannot be provoked here.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from outpost.broker import free_port
from outpost.services.telemetry.settings import InfluxSettings
from outpost.services.telemetry.writer import WriteFailed, Writer
from outpost.tsdb import VictoriaMetrics

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
