"""Subjects: the documented scheme, and tokens that cannot smuggle subject syntax."""

from __future__ import annotations

import pytest

from nbdnats import errors, subjects


def test_each_plane_and_kind_has_its_documented_subject() -> None:
    assert subjects.transfer("vm42-disk0") == (
        "data.cmd.vm42-disk0.open",
        "data.blk.vm42-disk0.c",
        "data.blk.vm42-disk0.a",
    )
    assert subjects.blocks("t1") == "data.blk.t1.>"
    assert subjects.data_event("t1", "progress") == "data.evt.t1.progress"
    assert subjects.ctl_event("node-a", "transfer") == "ctl.evt.node-a.transfer"
    assert subjects.ctl_command("node-a", "copy") == "ctl.cmd.node-a.copy"
    assert subjects.ctl_query("node-a", "nodes") == "ctl.qry.node-a.nodes"


@pytest.mark.parametrize("bad", ["a.b", "a b", "*", ">", "", "x" * 65, "é", "-rf", "../x"])
def test_tokens_reject_subject_syntax(bad: str) -> None:
    with pytest.raises(errors.UsageError, match="subject token"):
        subjects.transfer(bad)
