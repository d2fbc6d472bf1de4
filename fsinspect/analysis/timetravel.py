"""The inode map and submounts as they were at a moment of a capture (replay is time travel).

The analyzer keeps only the state at the end.  To see it as of an earlier exchange, the state changes the
analyzer made (replies applied, FORGETs) are made again, in capture-time order, on a scratch analyzer,
from the exchanges already decoded: no bytes are read or decoded again.  Copies of the exchanges are
used, so nothing the scratch analyzer notes (lints, submount flags) touches the real ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from dissectors.spec import fuse as spec

from .analyzer import Analyzer
from .exchange import Exchange

_FORGETS = frozenset(spec.OPCODE_BY_NAME[n].value for n in ("FORGET", "BATCH_FORGET"))


def moment_of(ex: Exchange) -> int:
    """When an exchange is over: its reply's time, or its request's if it has no reply (yet)."""
    return ex.reply_ts if ex.replied and ex.reply_ts is not None else ex.ts_ns


def state_at(exchanges: Sequence[Exchange], until_ns: int) -> Analyzer:
    """A scratch Analyzer whose `inodes` and `submounts` are as they were at `until_ns` (capture time).

    `exchanges` are in request order (an Analyzer's list); those whose request came later are not looked at.
    """
    events: list[tuple[int, int, Exchange]] = []
    for ex in exchanges:
        if ex.req_ts is not None and ex.req_ts > until_ns:
            break
        if ex.request is not None and ex.opcode in _FORGETS and ex.req_ts is not None:
            events.append((ex.req_ts, 0, ex))
        elif ex.replied and ex.reply_ts is not None and ex.reply_ts <= until_ns:
            events.append((ex.reply_ts, 1, ex))
    events.sort(key=lambda e: (e[0], e[1]))
    scratch = Analyzer(keep_exchanges=False)
    for _, kind, ex in events:
        c = dataclasses.replace(ex, lints=[], notes=[])
        if kind == 0:
            assert c.request is not None
            scratch._apply_forget(c, c.request)
        else:
            scratch._apply_reply(c)
    return scratch
