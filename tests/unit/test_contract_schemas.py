"""docs/contracts/ must be what the contracts generate (the wire format for non-Python readers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from outpost.contracts import CONTRACTS, json_schemas
from outpost.schemas import (
    README,
    REGENERATE,
    differences,
    expected_files,
    main,
    render_readme,
    summary,
    write_schemas,
)

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "docs" / "contracts"


def test_contract_schemas_are_current() -> None:
    diffs = differences(FOLDER)
    assert not diffs, "docs/contracts/ is out of date:\n  " + "\n  ".join(diffs) + f"\nrun: {REGENERATE}"


def test_one_schema_per_contract_and_a_readme() -> None:
    names = set(expected_files())
    assert names == {f"{n}.schema.json" for n in CONTRACTS} | {README}


def test_schema_files_are_pretty_sorted_and_end_with_a_newline() -> None:
    for name, schema in json_schemas().items():
        text = expected_files()[f"{name}.schema.json"]
        assert text.endswith("}\n")
        assert json.loads(text) == schema
        assert text == json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        assert schema["x-topic"] == CONTRACTS[name][1]
        assert schema["$id"].endswith(f"/{name}.schema.json")


def test_readme_lists_every_contract_once_with_its_topic() -> None:
    readme = render_readme()
    rows = [line for line in readme.splitlines() if line.startswith("| [")]
    assert len(rows) == len(CONTRACTS)
    for row, (name, (contract, topic)) in zip(rows, CONTRACTS.items(), strict=True):
        assert row.startswith(f"| [{name}]({name}.schema.json) | `{topic}` | ")
        assert ("| yes |" in row) is contract.batches
        assert row.count("|") - row.count("\\|") == 5  # four cells, nothing breaks the table


def test_summary_is_the_first_sentence_on_one_line() -> None:
    doc = """One thing, on ``a/{b}``
    (wrapped). More words.

    Another paragraph."""
    assert summary(doc) == "One thing, on `a/{b}` (wrapped)."
    assert summary("No full stop") == "No full stop"
    assert summary(None) == ""
    assert summary("Version 1.5 is kept. Rest.") == "Version 1.5 is kept."


def test_write_schemas_writes_removes_stale_and_is_idempotent(tmp_path: Path) -> None:
    folder = tmp_path / "contracts"
    stale = folder / "gone.schema.json"
    folder.mkdir()
    stale.write_text("{}\n")
    (folder / "notes.txt").write_text("kept\n")
    paths = write_schemas(folder)
    assert {p.name for p in paths} == set(expected_files())
    assert not stale.exists()
    assert (folder / "notes.txt").exists()  # only what looks generated is removed
    assert differences(folder) == []
    mtimes = {p: p.stat().st_mtime_ns for p in paths}
    write_schemas(folder)
    assert {p: p.stat().st_mtime_ns for p in paths} == mtimes  # unchanged files are not rewritten


def test_differences_name_what_is_wrong(tmp_path: Path) -> None:
    write_schemas(tmp_path)
    (tmp_path / "event.schema.json").write_text("{}\n")
    (tmp_path / README).unlink()
    (tmp_path / "old.schema.json").write_text("{}\n")
    diffs = "\n".join(differences(tmp_path))
    assert "event.schema.json: differs" in diffs
    assert "README.md: missing" in diffs
    assert "old.schema.json: no contract produces it" in diffs


def test_main_check_and_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--check"]) == 1
    assert REGENERATE in capsys.readouterr().err
    assert main([str(tmp_path)]) == 0
    assert main([str(tmp_path), "--check"]) == 0
