from outpost.recent import RecentIds


def test_the_oldest_ids_are_forgotten_first() -> None:
    r = RecentIds(3, ["a", "b", "c", "d"])
    assert "a" not in r and all(k in r for k in "bcd") and len(r) == 3
    r.add_all(["e"])
    assert "b" not in r and "e" in r
