"""``nbd-nats ctl adjacency`` over a real nats-server with JetStream: what it shows from the
events stream, and what it leaves out. Adjacencies here are published by the test as a node
would (the agent's own are tested with lldpd in test_adjacency/test_networking); the
injector's view is tested with the real injector in test_networking."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable

import nats
import pytest

from nbdnats import subjects
from nbdnats.ctl import events
from nbdnats.schemas import AdjacencyEvent, Uplink, encode
from tests.ctl import ctl, ok
from tests.nats_server import NatsServer


def _adjacency(node: str, **kw: object) -> AdjacencyEvent:
    fields: dict[str, object] = {
        "node": node,
        "loopbacks": ["2001:db8:100::7/128"],
        "uplinks": [
            Uplink(
                name="eth0",
                link_local="fe80::1",
                default_route=True,
                tor="tor1",
                port="swp1",
            )
        ],
        "interval": 30.0,
        "at": dt.datetime.now(dt.UTC),
    }
    fields.update(kw)
    return AdjacencyEvent(**fields)  # type: ignore[arg-type]


def _publish(url: str, *messages: tuple[str, bytes]) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        try:
            assert await events.ensure_stream(nc) is None
            js = nc.jetstream()
            for subject, data in messages:
                await js.publish(subject, data, stream=subjects.EVENTS_STREAM)
        finally:
            await nc.close()

    asyncio.run(go())


@pytest.fixture
def url(start_nats: Callable[..., NatsServer]) -> str:
    return start_nats(jetstream=True).url


def test_adjacency_lists_each_nodes_last_word_and_says_no_injector_answered(url: str) -> None:
    subject = subjects.ctl_event("bm1", subjects.ADJACENCY)
    old = _adjacency("bm1", loopbacks=["2001:db8:100::1/128"])
    _publish(
        url,
        (subject, encode(old)),
        (subject, encode(_adjacency("bm1"))),
        (
            subjects.ctl_event("bm2", subjects.ADJACENCY),
            encode(_adjacency("bm2", state="withdrawn", loopbacks=[])),
        ),
    )
    proc = ctl(url, "adjacency")
    out = ok(proc)
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert lines[0].split()[:8] == [
        "bm1",
        "up",
        "2001:db8:100::7/128",
        "eth0",
        "fe80::1",
        "tor1",
        "swp1",
        "?",
    ]
    assert lines[1].split()[:2] == ["bm2", "withdrawn"]
    assert "no route injector named 'route-injector' answers" in proc.stderr.decode()

    doc = json.loads(ok(ctl(url, "--json", "adjacency", "bm1")))
    assert [d["node"] for d in doc] == ["bm1"]
    assert doc[0]["uplinks"][0]["port"] == "swp1"
    assert doc[0]["routes"] is None


def test_adjacency_leaves_out_a_node_speaking_for_another_and_invalid_words(url: str) -> None:
    # Whoever may publish on ctl.evt.bm2.> (bm2's user) cannot be bm1: the subject decides.
    _publish(
        url,
        (subjects.ctl_event("bm2", subjects.ADJACENCY), encode(_adjacency("bm1"))),
        (subjects.ctl_event("bm3", subjects.ADJACENCY), b'{"node": "bm3", "loopbacks": 7}'),
        (subjects.ctl_event("bm4", subjects.ADJACENCY), b"\xff not json"),
    )
    proc = ctl(url, "adjacency")
    assert ok(proc) == ""
    assert "no adjacency announced" in proc.stderr.decode()


def test_a_node_silent_for_three_intervals_shows_as_lost(url: str) -> None:
    _publish(
        url,
        (subjects.ctl_event("bm1", subjects.ADJACENCY), encode(_adjacency("bm1", interval=0.05))),
    )
    # The stream's own timestamp decides; 3 x 0.05 s have passed once the command runs.
    line = ok(ctl(url, "adjacency", "bm1")).splitlines()[0]
    assert line.split()[:2] == ["bm1", "lost"]


@pytest.mark.parametrize("name", ["*", "bm1.>", "-bm1"])
def test_adjacency_refuses_a_node_name_that_is_not_a_token(url: str, name: str) -> None:
    # A wildcard would read every node's subject; '-' would look like an option.
    proc = ctl(url, "adjacency", "--", name)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert f"invalid node name {name!r}" in err and "Traceback" not in err
