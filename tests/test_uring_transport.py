"""FUSE over io_uring's pieces that need no mount: the C rings and their Python twin against the real
kernel, and the --uring decision on the fuse module's enable_uring parameter.  The mounted paths run in
test_daemon_standalone.py (conformance and signals on both rings)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from daemon.transport import uring, uring_py
from daemon.transport.fusedev import FuseDevError
from tests.standalone_mount import uring_missing


def _impls() -> list[type]:
    out: list[type] = [uring_py.Ring]
    try:
        from daemon.transport import _uring  # type: ignore[attr-defined]

        out.append(_uring.Ring)
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("Ring", _impls(), ids=lambda c: c.__module__.rsplit(".", 1)[-1])
def test_ring_on_a_file_that_is_not_fuse_is_a_clear_error(Ring: type) -> None:
    """A REGISTER on something else than /dev/fuse comes back as an OSError naming the command, once;
    then the queue is over (wait() returns None), and close() is idempotent."""
    if why := uring_missing():
        pytest.skip(why)
    r, w = os.pipe()
    try:
        ring = Ring(r, 0, 2, 1 << 20)
        ring.register()
        with pytest.raises(OSError) as ei:
            ring.wait()
        assert ei.value.errno == errno.EOPNOTSUPP
        assert "FUSE_IO_URING_CMD_REGISTER" in str(ei.value)
        assert ring.wait() is None
        ring.close()
        ring.close()
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("Ring", _impls(), ids=lambda c: c.__module__.rsplit(".", 1)[-1])
def test_ring_arguments_are_checked(Ring: type) -> None:
    for args in ((0, 0, 0, 1 << 20), (0, 0, 300, 1 << 20), (0, -1, 2, 1 << 20), (0, 0, 2, 100)):
        with pytest.raises(ValueError):
            Ring(*args)


def test_possible_cpus_parses_the_kernel_list(tmp_path: Path) -> None:
    f = tmp_path / "possible"
    f.write_text("0-3,6,8-9\n")
    assert uring.possible_cpus(str(f)) == [0, 1, 2, 3, 6, 8, 9]
    assert uring.possible_cpus(str(tmp_path / "missing")) == list(range(os.cpu_count() or 1))


def test_decide_follows_the_parameter(tmp_path: Path) -> None:
    """auto: only when enable_uring is on; off: never; on: turns it on (root) and says so; a kernel
    without the parameter: auto quietly keeps /dev/fuse, on is a one-line error."""
    param = tmp_path / "enable_uring"
    param.write_text("N\n")
    assert uring.decide("auto", str(param)) is False
    assert uring.decide("off", str(param)) is False
    if os.geteuid() == 0:
        assert uring.decide("on", str(param)) is True
        assert param.read_text() == "Y"
    else:
        with pytest.raises(FuseDevError, match="only root may turn it on"):
            uring.decide("on", str(param))
        param.write_text("Y\n")
    assert uring.decide("auto", str(param)) is True
    missing = str(tmp_path / "nothing")
    assert uring.decide("auto", missing) is False
    with pytest.raises(FuseDevError, match="no FUSE over io_uring"):
        uring.decide("on", missing)
