"""The test suite's inputs are the committed fixtures that tests/data/README.md lists."""

from __future__ import annotations

import hashlib
import re

from conftest import DATA


def listed() -> dict[str, str]:
    """file -> digest prefix, from the README's table."""
    rows = re.findall(r"^\| `([^`]+)` \| `([0-9a-f]{16})` \|$",
                      (DATA / "README.md").read_text(), flags=re.M)
    return dict(rows)


def test_fixtures_are_the_ones_the_readme_lists():
    table = listed()
    assert len(table) >= 40, "the README's table was not parsed"
    present = {p.relative_to(DATA).as_posix(): p for p in DATA.rglob("*")
               if p.is_file() and p.name != "README.md"}
    assert sorted(present) == sorted(table), "files and README table differ"
    wrong = [name for name, path in present.items()
             if hashlib.sha256(path.read_bytes()).hexdigest()[:16] != table[name]]
    assert not wrong, f"content differs from the README's digest: {wrong}"


def test_fixture_reader_fails_loudly_on_a_missing_file():
    import pytest

    from conftest import fixture

    with pytest.raises(pytest.fail.Exception, match="missing test fixture"):
        fixture("no-such-file.txt")
