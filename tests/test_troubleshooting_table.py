"""The README troubleshooting table is generated from real ``dig train`` runs and must not go stale.

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

TABLE = rc.REPO / ".readme_parts" / "troubleshooting.md"


def test_troubleshooting_table_is_up_to_date(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> None:
    ws = rc.shared_workspace(tmp_path_factory.getbasetemp(), tiny_dataset)
    table = rc.render_table(rc.run_all(ws))
    for case in rc.CASES:  # every case is in it, with its exit code and message
        assert f"| {case.title} | 2 | `error: " in table
    assert TABLE.is_file(), f"{TABLE} missing: run .venv/bin/python tests/test_troubleshooting_table.py"
    assert TABLE.read_text() == table, f"{TABLE} is stale: run .venv/bin/python tests/test_troubleshooting_table.py"


def main() -> int:
    import logging

    logging.basicConfig(level=logging.ERROR)
    from dig_torchrec.data.synthetic import generate, preset

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "micro"
        generate(preset("micro", seed=0), data, processes=1)  # the same dataset as tests/conftest.py
        ws = rc.make_workspace(Path(tmp) / "bad-input", data)
        TABLE.parent.mkdir(parents=True, exist_ok=True)
        TABLE.write_text(rc.render_table(rc.run_all(ws)))
    print(f"wrote {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
