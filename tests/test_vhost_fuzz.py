"""The vhost-user front of the daemon and of the proxy under a hostile front-end (tests/fuzz_vhost.py): a
small seeded budget in CI, 1M cases each in `./scripts/check --slow` (FSI_SLOW_CASES); plus the
regression tests of what the campaign found."""

from __future__ import annotations

import gc
import os
import time

import pytest

from dissectors.transport.wire import recv_message, send_message
from tests.conftest import require_root
from tests.fuzz_vhost import PING, VhostCampaign, quiet_logs, run_campaign
from tests.fuzzbudget import SLOW_CASES, report

pytestmark = pytest.mark.root
CI_CASES = int(os.environ.get("FSI_FUZZ_EXAMPLES", "3000"))


def _campaign(kind: str, seed: int, cases: int) -> None:
    require_root()
    t0 = time.monotonic()
    c = run_campaign(kind, seed, cases)
    report(f"vhost-user front ({kind}): crafted/mutated messages, fds, memory tables, kicks", c.cases,
           time.monotonic() - t0, f"seed {seed}, {c.sessions} sessions, {c.kicked} kicks")
    assert c.cases >= cases and c.sessions > 1


@pytest.mark.parametrize("kind", ["daemon", "proxy"])
def test_fuzz_vhost_user_front(kind: str) -> None:
    _campaign(kind, 1, CI_CASES)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["daemon", "proxy"])
def test_fuzz_vhost_user_front_1m(kind: str) -> None:
    _campaign(kind, int(os.environ.get("FSI_FUZZ_SEED", time.time_ns() % 2**32)), SLOW_CASES)


def test_proxy_closes_the_fds_of_a_message_it_refuses_half_way() -> None:
    """Found by the campaign: a SET_MEM_TABLE while queues run is a protocol violation raised while the
    proxy executes its commands, which skipped closing the message's fds (one memfd per such session)."""
    require_root()
    c = VhostCampaign("proxy", 1)
    try:
        with quiet_logs():
            for _round in range(4):
                c.begin_session()
                assert c.front is not None
                for name, raw in c.script:  # QEMU's setup: both queues run
                    fds = {"SET_VRING_KICK": [c.kit.kicks[0]], "SET_VRING_CALL": [c.kit.calls[0]],
                           "SET_MEM_TABLE": [c.kit.memfd]}.get(name, [])
                    send_message(c.front, raw, fds)
                    if name.startswith("GET"):
                        recv_message(c.front)
                send_message(c.front, PING)
                assert recv_message(c.front)[0][:4] == PING[:4]
                table = next(raw for name, raw in c.script if name == "SET_MEM_TABLE")
                send_message(c.front, table, [c.kit.memfd])
                c.expect_end()
                gc.collect()
                if _round == 0:
                    before = len(os.listdir("/proc/self/fd"))
        assert c.target.reasons[-1] == "protocol violation: a new memory table while queues run"  # type: ignore[union-attr]
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        c.close()


def test_proxy_refuses_a_reply_from_qemu_in_one_line() -> None:
    """Found by the campaign: a front-end message with the REPLY flag (SET_VRING_ENABLE decoded with its
    reply's u64 layout) reached the control plane's request handler, and the proxy's control thread died
    on a TypeError with a traceback.  It is a protocol violation, named in one line."""
    require_root()
    c = VhostCampaign("proxy", 1)
    try:
        with quiet_logs() as logs:
            c.begin_session()
            assert c.front is not None
            raw = bytearray(next(raw for name, raw in c.script if name == "SET_VRING_ENABLE"))
            raw[4] |= 0x4
            send_message(c.front, bytes(raw))
            c.expect_end()
        assert not logs.bugs
        reason = c.target.reasons[-1]  # type: ignore[union-attr]
        assert reason.startswith("protocol violation: SET_VRING_ENABLE") and "REPLY" in reason, reason
    finally:
        c.close()
