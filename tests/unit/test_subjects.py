"""Subjects: the documented scheme, and tokens that cannot smuggle subject syntax."""

from __future__ import annotations

import pytest

from nbdnats import _core, errors, subjects


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


def test_a_striped_transfers_children_are_ordinary_transfers_named_from_its_id() -> None:
    children = subjects.stripe_transfers("vm42")
    assert children is not None and len(children) == _core.MAX_STREAMS
    assert children[0] == ("vm42-s0", subjects.transfer("vm42-s0"))
    assert [c for c, _ in children] == [subjects.stripe_id("vm42", k) for k in range(8)]
    assert children[2][1] == ("data.cmd.vm42-s2.open", "data.blk.vm42-s2.c", "data.blk.vm42-s2.a")


def test_an_id_too_long_for_its_childrens_ids_cannot_be_striped() -> None:
    longest = "x" * subjects.MAX_STRIPED_ID
    assert subjects.MAX_STRIPED_ID == 61
    children = subjects.stripe_transfers(longest)
    assert children is not None and subjects.is_token(children[-1][0])
    assert subjects.stripe_transfers(longest + "x") is None  # still a transfer id
    with pytest.raises(errors.UsageError, match="subject token"):
        subjects.stripe_transfers("a.b")
