"""The JetStream stream that keeps ctl events: the code's definition is the deployed one."""

from __future__ import annotations

import json
from pathlib import Path

from nbdnats.ctl import events

ROOT = Path(__file__).resolve().parents[2]


def test_events_stream_matches_the_control_definition() -> None:
    on_disk = json.loads((ROOT / "control" / "streams" / "ctl-events.json").read_text())
    assert on_disk == events.DEFINITION
    config = events.stream_config(1)
    assert config.num_replicas == 1 and config.subjects == ["ctl.evt.>"]
    assert config.max_age == 7 * 24 * 3600  # nats-py takes seconds
