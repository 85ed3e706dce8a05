"""The public API: what ``nbdnats`` exports."""

from __future__ import annotations


def test_every_exported_name_resolves() -> None:
    """The package loads most names on first use; each one in __all__ must load."""
    import nbdnats

    missing = [n for n in nbdnats.__all__ if getattr(nbdnats, n, None) is None]
    assert missing == []
