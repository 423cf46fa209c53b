"""``force`` of ``daemon.stop`` and ``snapshot.destroy`` is declared in the
control protocol's schema: a boolean, checked before anything runs."""

from __future__ import annotations

import errno

import pytest

from blksnap.control.protocol import validate_request
from blksnap.errors import BlksnapError


@pytest.mark.parametrize(
    ("op", "args"),
    [("daemon.stop", {}), ("snapshot.destroy", {"id": "0b9f0d52-4c1e-4a8e-9d1f-6a3c5d0e2f11"})],
)
def test_force_is_a_declared_boolean(op, args):
    for force in (True, False):
        _, got_op, got = validate_request(
            {"version": 1, "id": 1, "op": op, "args": {**args, "force": force}}
        )
        assert got_op == op and got["force"] is force
    with pytest.raises(BlksnapError) as exc:
        validate_request({"version": 1, "id": 1, "op": op, "args": {**args, "force": "yes"}})
    assert exc.value.errno == errno.EINVAL
