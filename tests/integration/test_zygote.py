"""The zygote forks services from one process that imported what they share (outpost.zygote):
each child must be what ``python -m MODULE`` would have been, and every exit must be reported,
its zygote's death included. Real processes, real signals."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import orjson
import pytest

from outpost.zygote import Forked, Zygote

CHILD = "tests.zygote_child"


@pytest.fixture
def zygote() -> Iterator[Zygote]:
    z = Zygote([CHILD, "no.such.module"], dict(os.environ))
    yield z
    z.stop()


def _env(do: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "ZYGOTE_DO": do,
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    }


def _output(child: Forked) -> list[str]:
    return child.stdout.read().decode().splitlines()


def test_a_forked_service_is_what_python_m_would_have_been(zygote: Zygote) -> None:
    env = _env("report")
    child = zygote.spawn("probe", CHILD, env)
    lines = _output(child)
    assert child.wait(30) == 0
    assert lines[0] == "a line of output"  # stdout and stderr both on the pipe
    doc = orjson.loads(lines[-1])
    assert doc["env"] == env  # its environment whole, nothing of the zygote's
    assert doc["pid"] == child.pid and doc["sid"] == child.pid  # its own session
    assert doc["title"] == "outpost: probe"  # what ps shows
    assert doc["preloaded"] is True  # imported once, in the zygote; a module it could not import is skipped
    assert doc["stdin"] == "/dev/null" and doc["argv"][0].endswith("__main__.py")


@pytest.mark.parametrize(("do", "code", "said"), [("exit:3", 3, ""), ("raise", 1, "this service has a bug")])
def test_exit_codes_come_back_as_from_python(zygote: Zygote, do: str, code: int, said: str) -> None:
    child = zygote.spawn("probe", CHILD, _env(do))
    out = "\n".join(_output(child))
    assert child.wait(30) == code
    assert said in out and ("Traceback" in out) == (do == "raise")


def test_the_child_ends_as_python_ends(zygote: Zygote) -> None:
    child = zygote.spawn("probe", CHILD, _env("atexit"))
    assert _output(child) == ["thread done", "atexit ran"]
    assert child.wait(30) == 0


def test_signals_reach_the_child_and_come_back_as_negative_codes(zygote: Zygote) -> None:
    term, killed = (zygote.spawn(f"s{i}", CHILD, _env("sleep")) for i in range(2))
    for c in (term, killed):
        assert c.stdout.readline() == b"sleeping\n"
    assert term.poll() is None
    term.send_signal(signal.SIGTERM)
    killed.kill()
    assert term.wait(30) == -signal.SIGTERM and killed.wait(30) == -signal.SIGKILL


def test_many_children_at_once_each_get_their_own_exit(zygote: Zygote) -> None:
    """Children that exit at once race their own spawn's reply: each handle still gets its code."""
    got: dict[int, int] = {}

    def one(i: int) -> None:
        child = zygote.spawn(f"c{i}", CHILD, _env(f"exit:{i}"))
        child.stdout.read()
        got[i] = child.wait(30)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == {i: i for i in range(24)}


def test_a_killed_zygote_takes_its_children_down_and_a_new_one_serves(zygote: Zygote) -> None:
    child = zygote.spawn("probe", CHILD, _env("sleep"))
    assert child.stdout.readline() == b"sleeping\n"
    first = zygote.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    assert child.wait(30) == -signal.SIGTERM  # told by the kernel as its zygote died (PDEATHSIG)
    again = zygote.spawn("probe", CHILD, _env("exit:0"))
    again.stdout.read()
    assert again.wait(30) == 0 and zygote.pid not in (None, first)
