"""The answers kept for redelivered requests: found again after a restart, bounded."""

from __future__ import annotations

from pathlib import Path

from outpost.services.memory.answers import Answers


def test_an_answer_is_found_again_after_a_restart(tmp_path: Path) -> None:
    a = Answers(tmp_path / "answers.db")
    a.put(("outpost/v1/s/memory/resp/agent", b"c1"), b'{"ok":true,"result":1}')
    a.close()
    b = Answers(tmp_path / "answers.db")
    assert b.get(("outpost/v1/s/memory/resp/agent", b"c1")) == b'{"ok":true,"result":1}'
    assert b.get(("outpost/v1/s/memory/resp/other", b"c1")) is None  # another client's c1
    b.close()


def test_at_most_keep_answers_are_kept(tmp_path: Path) -> None:
    a = Answers(tmp_path / "answers.db", keep=50)
    for i in range(300):
        a.put(("t", str(i).encode()), b"x")
    assert len(a) <= 150  # pruned every 100 puts down to the newest 50
    assert a.get(("t", b"299")) == b"x" and a.get(("t", b"0")) is None
    a.close()
