"""The documented Python examples type-check as written: no casts for what ``wait`` returns."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _controller_example() -> str:
    text = (ROOT / "docs" / "python-api.md").read_text()
    section = text.split("## Controller", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "docs/python-api.md has no Controller example"
    return match.group(1)


def test_controller_example_type_checks_without_casts(tmp_path: Path) -> None:
    example = tmp_path / "example.py"
    example.write_text(_controller_example())
    mypy = [sys.executable, "-m", "mypy", "--check-untyped-defs", "--no-error-summary"]
    run = subprocess.run(
        [*mypy, "--cache-dir", str(tmp_path / "cache"), "--config-file", "", str(example)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout == ""
