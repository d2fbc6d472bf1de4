"""The vhost-user front of the daemon and of the proxy under a hostile front-end (tests/fuzz_vhost.py): a
small seeded budget in CI, 1M cases each in `./scripts/check --slow` (FSI_SLOW_CASES); plus the
regression tests of what the campaign found."""

from __future__ import annotations

import gc
import os
import socket
import struct
import time
from typing import Any

import pytest

from dissectors.transport.wire import recv_message, send_message
from tests.conftest import require_root
from tests.fuzz_vhost import MEM, PING, PINGS, UVA, VhostCampaign, qemu_script, quiet_logs, run_campaign
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


def _start_queues(c: VhostCampaign) -> None:
    """A new session through QEMU's setup (both queues run, each with its own kick and call fd), pinged."""
    c.begin_session()
    assert c.front is not None
    for name, raw in c.script:
        q = struct.unpack_from("<Q", raw, 12)[0] & 1 if len(raw) >= 20 else 0
        fds = {"SET_VRING_KICK": [c.kit.kicks[q]], "SET_VRING_CALL": [c.kit.calls[q]],
               "SET_MEM_TABLE": [c.kit.memfd]}.get(name, [])
        send_message(c.front, raw, fds)
        if name.startswith("GET"):
            recv_message(c.front)
    send_message(c.front, PING)
    assert recv_message(c.front)[0][:4] == PING[:4]


def test_proxy_closes_the_fds_of_a_message_it_refuses_half_way() -> None:
    """Found by the campaign: a SET_MEM_TABLE while queues run is a protocol violation raised while the
    proxy executes its commands, which skipped closing the message's fds (one memfd per such session)."""
    require_root()
    c = VhostCampaign("proxy", 1)
    try:
        with quiet_logs():
            for _round in range(4):
                _start_queues(c)
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


def test_proxy_gives_back_a_sessions_fds_when_it_ends() -> None:
    """Found by the 1M-case campaign (fds over the baseline now and then): at shutdown the proxy closed
    its own fds, but each queue's shadow path kept its 4 fd dups and its wake-up eventfd, the capture
    buffer its eventfd, and the mappings their memfd dups (and the guest's RAM), until the Proxy object
    went.  Whoever keeps a Proxy for its counters (the summary, a UI, a loop of sessions) kept them: a
    deferred close, not a double close (strace over 30k cases: every close matched its open).  Now the
    session's end gives them back, on both ring engines, with the Proxy still alive."""
    require_root()
    c = VhostCampaign("proxy", 1)
    try:
        with quiet_logs():
            before = len(os.listdir("/proc/self/fd"))
            for _round in range(3):
                _start_queues(c)
                proxy = c.target.proxy  # type: ignore[union-attr]
                assert sorted(i for i, q in proxy.queues.items() if q.path is not None and q.path.running) == [0, 1]
                c.end_session()
                # The Proxy is still referenced (by the target and here): its session's fds are gone.
                assert len(os.listdir("/proc/self/fd")) == before, sorted(
                    os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd"))
                assert proxy.capture.fileno() == -1 and all(q.path.counters for q in proxy.queues.values())
    finally:
        c.close()


def _refused_in_one_line(messages: list[tuple[bytes, list[int]]], reason: str, kit_fds: Any = None) -> None:
    """Send `messages` from the campaign's QEMU (fds from its kit: `kit_fds(kit) -> [[fd, ...], ...]`); the
    proxy must end the session with `reason` (a prefix), no thread dying, and every fd back."""
    require_root()
    c = VhostCampaign("proxy", 1)
    try:
        with quiet_logs() as logs:
            before = len(os.listdir("/proc/self/fd"))
            c.begin_session()
            assert c.front is not None
            fds = kit_fds(c.kit) if kit_fds else [[] for _ in messages]
            for (raw, _), mfds in zip(messages, fds, strict=True):
                send_message(c.front, raw, mfds)
                if raw[:4] in {p[:4] for p in PINGS}:
                    recv_message(c.front)
            c.expect_end()
            assert not logs.bugs, logs.bugs[0]
        assert c.target.reasons[-1].startswith(reason), c.target.reasons[-1]  # type: ignore[union-attr]
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        c.close()


def test_proxy_refuses_a_memory_table_with_the_reply_flag_in_one_line() -> None:
    """Found by the 1M-case campaign: a SET_MEM_TABLE with the REPLY flag is decoded with its reply's
    layout (a u64), and the fd check walked that u64 as regions: the control thread died on an
    AttributeError and the message's fds stayed open."""
    raw = struct.pack("<IIIQ", 5, 0x5, 8, 0)
    _refused_in_one_line([(raw, [])], "protocol violation: SET_MEM_TABLE with the REPLY flag",
                         lambda kit: [[kit.memfd, kit.memfd, kit.small]])


def test_proxy_refuses_to_start_a_queue_whose_rings_left_the_memory_table() -> None:
    """Found by the 1M-case campaign: the rings were checked at SET_VRING_ADDR, then a new memory table
    (at other user addresses) left them outside every region; starting the queue raised RingError
    (no_region) in the control thread, which died with a traceback."""
    import dissectors.scapy as S

    script = qemu_script()
    upto = next(i for i, (name, raw) in enumerate(script) if name == "SET_VRING_ADDR")
    moved = bytes(S.VhostUser(request=5) / S.VhostUserSetMemTable(regions=[S.VhostUserMemoryRegion(
        guest_address=0, size=MEM, user_address=UVA + (1 << 32), mmap_offset=0)]))
    tail = [(raw, []) for name, raw in script[upto + 1:] if name in ("SET_VRING_KICK", "SET_VRING_CALL",
                                                                     "SET_VRING_ENABLE")][:3]
    msgs = [(raw, []) for _name, raw in script[:upto + 1]] + [(moved, [])] + tail

    def fds(kit: Any) -> list[list[int]]:
        names = [name for name, _ in script[:upto + 1]] + ["SET_MEM_TABLE", "SET_VRING_KICK", "SET_VRING_CALL",
                                                             "SET_VRING_ENABLE"]
        return [{"SET_MEM_TABLE": [kit.memfd], "SET_VRING_KICK": [kit.kicks[0]],
                 "SET_VRING_CALL": [kit.calls[0]]}.get(n, []) for n in names]

    _refused_in_one_line(msgs, "protocol violation: vring 0 cannot start: its rings are not in the memory table",
                         fds)


def test_proxy_refuses_a_vring_base_beyond_16_bits_in_one_line() -> None:
    """Found by the 1M-case campaign: SET_VRING_BASE carries a u32, and a base over 65535 reached the
    shadow ring's 16-bit index (struct.error in the control thread at SET_VRING_ADDR)."""
    import dissectors.scapy as S

    script = qemu_script()
    upto = next(i for i, (name, _raw) in enumerate(script) if name == "SET_VRING_NUM")
    base = bytes(S.VhostUser(request=10) / S.VhostUserSetVringBase(index=0, num=0x10000))
    msgs = [(raw, []) for _name, raw in script[:upto + 1]] + [(base, [])]
    fds = [[] for _ in msgs]
    fds[next(i for i, (name, _raw) in enumerate(script) if name == "SET_MEM_TABLE")] = [0]
    _refused_in_one_line(msgs, "protocol violation: vring 0: base 65536 is not a 16-bit ring index",
                         lambda kit: [[kit.memfd] if f else [] for f in fds])


def _answered_by_the_proxy(c: VhostCampaign) -> None:
    """With the back-end gone, the proxy answers QEMU's pings itself."""
    assert c.front is not None
    for ping in PINGS:
        send_message(c.front, ping)
        assert recv_message(c.front)[0][:4] == ping[:4]


def test_proxy_survives_a_backend_loss_after_a_stopped_queues_rings_left_the_table() -> None:
    """Found by the 1M-case campaign: a queue stopped (GET_VRING_BASE), a new memory table without its
    rings, then the back-end went: the EIO fallback translated the stopped queue's rings and died on
    RingError (no_region).  Such a queue has nothing to serve; the proxy goes on answering QEMU."""
    import dissectors.scapy as S

    require_root()
    c = VhostCampaign("proxy", 1)
    try:
        with quiet_logs() as logs:
            _start_queues(c)
            assert c.front is not None
            for q in (0, 1):
                send_message(c.front, bytes(S.VhostUser(request=11) / S.VhostUserGetVringBase(index=q)))
                recv_message(c.front)
            moved = bytes(S.VhostUser(request=5) / S.VhostUserSetMemTable(regions=[S.VhostUserMemoryRegion(
                guest_address=0, size=MEM, user_address=UVA + (1 << 32), mmap_offset=0)]))
            send_message(c.front, moved, [c.kit.memfd])
            send_message(c.front, PING)  # the table is in place before the back-end goes
            assert recv_message(c.front)[0][:4] == PING[:4]
            c.target.proxy.backend_sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
            _answered_by_the_proxy(c)
            c.end_session()
            assert not logs.bugs, logs.bugs[0]
        assert c.target.reasons[-1] == "QEMU disconnected"  # type: ignore[union-attr]
    finally:
        c.close()


def test_proxy_survives_a_backend_gone_under_an_undecodable_message() -> None:
    """Found by the 1M-case campaign (seed 2203392528, case 930361): a message the proxy cannot decode is
    forwarded as it is; with the back-end gone that send raised BrokenPipeError and the control thread
    died.  It is a back-end loss like any other: QEMU is answered by the proxy from then on."""
    require_root()
    c = VhostCampaign("proxy", 1)
    try:
        with quiet_logs() as logs:
            _start_queues(c)
            assert c.front is not None
            c.target.proxy.backend_sock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
            send_message(c.front, struct.pack("<III", 46, 1, 0))  # a request code nobody knows
            _answered_by_the_proxy(c)
            c.end_session()
            assert not logs.bugs, logs.bugs[0]
        assert c.target.proxy.stats.backend_lost_ns is not None  # type: ignore[union-attr]
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
