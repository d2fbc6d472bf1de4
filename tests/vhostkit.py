"""The CLI vhost-user daemon as users start it, driven over its socket by the rerun front-end (no guest)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dissectors import fuse as F
from fsinspect.guest import launcher
from fsinspect.rerun.front import F_INDIRECT_DESC, F_PROTOCOL, F_VERSION_1, Front, Negotiation

_UNIQUE = itertools.count(1)


def unique() -> int:
    """A request's `unique`, never one fuse_ok() used."""
    return next(_UNIQUE)


def fuse_ok(front: Front, op: str, args: dict[str, Any] | None = None, nodeid: int = 1) -> F.Reply:
    """One request, waited for; it must succeed."""
    raw = F.encode_request(op, args, unique=unique(), nodeid=nodeid)
    rep = F.decode_reply(front.roundtrip(raw), F.decode_request(raw))
    assert isinstance(rep, F.Reply) and rep.error == 0, (op, rep)
    return rep


@contextmanager
def cli_daemon(share: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], Front]]:
    """`fsinspect daemon --socket-path=... -o source=SHARE ARGS`, connected, FUSE_INIT done; stopped after."""
    with launcher.short_tmpdir() as work:
        sock = work / "d.sock"
        proc = subprocess.Popen([sys.executable, "-m", "fsinspect", "daemon", f"--socket-path={sock}", "-o",
                                 f"source={share}", "--log-level", "error", *args], stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 20
            while not sock.exists():
                assert proc.poll() is None and time.monotonic() < deadline, "the daemon did not start"
                time.sleep(0.02)
            front = Front(sock, Negotiation(features=F_VERSION_1 | F_INDIRECT_DESC | F_PROTOCOL))
            try:
                fuse_ok(front, "INIT", {"init": F.make("fuse_init_in", major=7, minor=38, flags=0)}, nodeid=0)
                yield proc, front
            finally:
                front.close()
        finally:
            launcher.stop_process(proc)
