"""The tables the core defines and Python restates stay in step: error codes, stats fields."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

from nbdnats import _core, errors
from nbdnats._bridge import _settle
from nbdnats.ctl.controller import OperationResult, _cause
from nbdnats.schemas import Report, TransferEvent

STUB = Path(__file__).parents[2] / "nbdnats" / "_core.pyi"


def _stub_properties(cls: str) -> list[str]:
    tree = ast.parse(STUB.read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
    return [
        f.name
        for f in node.body
        if isinstance(f, ast.FunctionDef)
        and any(isinstance(d, ast.Name) and d.id == "property" for d in f.decorator_list)
    ]


def test_every_core_error_code_has_its_own_exception_class() -> None:
    assert _core.ERROR_CODES
    for code in _core.ERROR_CODES:
        err = errors.from_code(code, "it failed")
        assert type(err).code == code, (code, type(err))
        assert str(err) == "it failed"


def test_a_code_of_the_peers_own_is_a_remote_error() -> None:
    assert type(errors.from_code("aborted", "gone")) is errors.RemoteError


def test_a_failure_the_peer_reported_says_so_as_data() -> None:
    async def settle(value: object) -> BaseException | None:
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        _settle(fut, False, value)
        return fut.exception()

    theirs = asyncio.run(settle(("timeout", "peer: the sender gave up", True)))
    ours = asyncio.run(settle(("timeout", "the sender went quiet", False)))
    assert isinstance(theirs, errors.NbdNatsError) and theirs.from_peer
    assert str(theirs) == "peer: the sender gave up"
    assert isinstance(ours, errors.TransferTimeout) and not ours.from_peer


def test_the_stub_lists_the_stats_fields_of_the_core() -> None:
    assert _stub_properties("Stats") == list(_core.STATS_FIELDS)


def test_every_stats_field_is_an_attribute_of_stats() -> None:
    for field in _core.STATS_FIELDS:
        assert hasattr(_core.Stats, field), field


def test_the_report_takes_its_counters_from_the_stats_fields() -> None:
    own = {"id", "sender", "format"}  # set by the caller, not read from the core
    assert set(Report.__struct_fields__) - own <= set(_core.STATS_FIELDS)


def test_the_controller_blames_the_end_whose_failure_is_its_own() -> None:
    def end(node: str, role: str, code: str, error: str, from_peer: bool) -> TransferEvent:
        return TransferEvent(
            transfer_id="t",
            node=node,
            role=role,
            state="failed",
            error_code=code,
            error=error,
            from_peer=from_peer,
        )

    sender = end("a", "send", "timeout", "peer: the receiver gave up", True)
    receiver = end("b", "recv", "endpoint", "cannot write the target", False)
    err = _cause(OperationResult("t", sender, receiver))
    assert isinstance(err, errors.EndpointError)
    assert str(err) == "b: cannot write the target"
