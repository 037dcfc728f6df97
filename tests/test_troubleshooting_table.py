"""The README troubleshooting table is generated from the bad-input matrix's real ``dig`` runs
(``tests/reliability_cases.py``) and must not go stale.

Regenerate it after changing an error message::

    .venv/bin/python tests/test_troubleshooting_table.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reliability_cases as rc  # noqa: E402

README = rc.REPO / "README.md"
START, END = "<!-- troubleshooting-table:start -->", "<!-- troubleshooting-table:end -->"


def readme_table() -> str:
    """The generated block of README.md (between the markers)."""
    text = README.read_text()
    assert START in text and END in text, f"{README} lacks the {START} ... {END} markers"
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def write_readme_table(table: str) -> None:
    text = README.read_text()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(f"{head}{START}\n{table.rstrip()}\n{END}{tail}")


def test_troubleshooting_table_is_up_to_date(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> None:
    ws = rc.shared_workspace(tmp_path_factory.getbasetemp(), tiny_dataset)
    table = rc.render_table(rc.run_all(ws))
    outcomes = rc.run_all(ws)
    for case in rc.CASES:  # every case is in it, with its exit code and message
        assert f"| `dig {case.command}` | {case.title}" in table
        assert f"| {case.rc} | `{outcomes[case.id].first_line.replace('|', chr(92) + '|')}` |" in table
    assert readme_table() == table, f"{README} troubleshooting table is stale: run .venv/bin/python tests/test_troubleshooting_table.py"


def main() -> int:
    import logging

    logging.basicConfig(level=logging.ERROR)
    from dig_torchrec.data.synthetic import generate, preset

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "micro"
        generate(preset("micro", seed=0), data, processes=1)  # the same dataset as tests/conftest.py
        ws = rc.make_workspace(Path(tmp) / "bad-input", data)
        write_readme_table(rc.render_table(rc.run_all(ws)))
    print(f"updated the troubleshooting table in {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
