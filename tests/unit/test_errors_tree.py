"""The error tree: each wire code raises its class."""

from __future__ import annotations

from nbdnats import errors


def test_error_codes_map_to_their_classes_and_unknown_ones_to_remote_error() -> None:
    assert isinstance(errors.from_code("target_too_small", "m"), errors.TargetTooSmallError)
    assert isinstance(errors.from_code("target_too_small", "m"), errors.EndpointError)
    assert isinstance(errors.from_code("busy", "m"), errors.TransferError)
    assert isinstance(errors.from_code("cancelled", "m"), errors.TransferCancelled)
    unknown = errors.from_code("aborted", "the sender gave up")
    assert isinstance(unknown, errors.RemoteError) and str(unknown) == "the sender gave up"
