"""Which run a checkpoint makes, and what a killed run's bitmaps become."""

from __future__ import annotations

import pytest

from nbdnats.backup.views import FIRST, Bitmap, check_since, decide, new_name, stale
from nbdnats.errors import UsageError

A = "nbdnats-20260101T000000-aaaaaa"
B = "nbdnats-20260101T000100-bbbbbb"
C = "nbdnats-20260101T000200-cccccc"


def test_new_names_have_the_checkpoint_form() -> None:
    name = new_name()
    check_since(name)
    assert name != new_name()


@pytest.mark.parametrize("bad", ["x", "nbdnats-1", A + "; rm", "--add", A.upper()])
def test_since_that_is_not_a_checkpoint_name_is_refused(bad: str) -> None:
    with pytest.raises(UsageError):
        check_since(bad)


def test_incremental_when_since_is_consistent_and_free_on_every_disk() -> None:
    ok = [Bitmap(A, recording=True)]
    assert decide(A, {"vm/a": ok, "vm/b": ok}, "x") == ""


def test_full_run_says_why() -> None:
    assert decide(None, {"vm/a": []}, "x") == FIRST
    on_a = {"vm/a": [Bitmap(A, True)], "vm/b": []}
    assert decide(A, on_a, "x") == (
        f"bitmap {A} not on vm/b: it was removed, never made there, or lost "
        "when the VM stopped uncleanly before QEMU stored it"
    )
    bad = {"vm/a": [Bitmap(A, True, inconsistent=True)]}
    assert decide(A, bad, "the VM stopped uncleanly") == (
        f"bitmap {A} on vm/a is inconsistent: the VM stopped uncleanly"
    )
    busy = {"vm/a": [Bitmap(A, True, busy=True)]}
    assert decide(A, busy, "x") == f"bitmap {A} is in use by another job"


def test_a_killed_runs_bitmap_is_merged_into_since_and_foreign_ones_are_left() -> None:
    bitmaps = [Bitmap(A, False), Bitmap(B, True), Bitmap("theirs", True), Bitmap(C, True, True)]
    assert stale(A, bitmaps) == ([B], [])
    # Without a usable since, ours are removed: the next run is full anyway.
    assert stale(None, bitmaps) == ([], [A, B])
    assert stale(A, [Bitmap(A, False, inconsistent=True), Bitmap(B, True)]) == ([], [B])
    assert stale(A, [Bitmap(A, True), Bitmap(B, True, inconsistent=True)]) == ([], [B])
