"""The migration's steps declare the states they may start from (nbdnats.migration.run):
a step called out of order refuses before it sends either QEMU anything."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from nbdnats.migration.paths import DirectPath, Sockets
from nbdnats.migration.run import State, StateError, _Run, caps


class Untouchable:
    """A monitor that fails the test if the run uses it."""

    side = "test"

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the run used the monitor ({name}) in a state it may not")


def a_run(state: State) -> _Run:
    monitor = cast(Any, Untouchable())
    return _Run(
        src=monitor,
        dst=monitor,
        path=DirectPath(),
        migration_id="t",
        timeout=1,
        mirror_speed=0,
        return_path=False,
        on_progress=None,
        changed=asyncio.Event(),
        state=state,
    )


def test_a_step_out_of_order_refuses_before_touching_qemu() -> None:
    run = a_run(State.CONNECTING)
    with pytest.raises(StateError, match="switchover may start only while migrating"):
        asyncio.run(run.switchover(0))
    with pytest.raises(StateError, match="mirror may start only while preparing"):
        asyncio.run(run.mirror(Sockets(nbd="", migration="")))
    assert run.state == State.CONNECTING


@pytest.mark.parametrize("state", [State.HANDOVER, State.DONE, State.CONNECTING])
def test_nothing_to_roll_back_before_preparing_or_once_committed(state: State) -> None:
    run = a_run(state)
    with pytest.raises(StateError, match="rollback may start only while preparing"):
        asyncio.run(run.rollback())
    assert run.committed == (state in (State.HANDOVER, State.DONE))


@pytest.mark.parametrize(
    ("rate", "disks", "mirror_speed", "want"),
    [
        (None, 2, 0, (0, 0)),  # no cap: QEMU's limits stay as they are
        (None, 2, 5, (0, 5)),  # --mirror-speed alone, as before
        (100, 1, 0, (100, 100)),
        (100, 4, 0, (100, 25)),  # the mirrors share the cap
        (100, 4, 10, (100, 10)),  # a lower --mirror-speed wins
        (100, 4, 50, (100, 25)),  # a higher one does not lift a disk above its share
        (3, 4, 0, (3, 1)),  # never 0, which QEMU reads as no limit
    ],
)
def test_a_migrations_cap_is_shared_by_its_ram_and_mirrors(
    rate: int | None, disks: int, mirror_speed: int, want: tuple[int, int]
) -> None:
    assert caps(rate, disks, mirror_speed) == want
