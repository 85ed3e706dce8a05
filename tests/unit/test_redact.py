"""redact_url against the cases the core's redaction is tested with (ext/src/conn.rs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdnats.planes import redact_url

CASES = [
    tuple(line.split("\t", 1))
    for line in (Path(__file__).parent.parent / "redact_cases.txt").read_text().splitlines()
    if not line.startswith("#")
]


@pytest.mark.parametrize(("url", "want"), CASES)
def test_redact_url_masks_passwords_and_tokens(url: str, want: str) -> None:
    assert redact_url(url) == want
