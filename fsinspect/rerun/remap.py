"""Map what one back-end chose onto what the recording used: nodeids, file handles, dir cookies, uniques.

`learn` reads an exchange's two replies side by side (recorded, new); `request` rewrites a recorded
request for the new back-end.  Lock owners and pids are the kernel's, not the back-end's: they pass as
recorded.  A value never learnt (the new back-end failed the LOOKUP that would have taught it) passes
unchanged, so the new back-end answers it as it would a stale handle: that shows up in the diff.
"""

from __future__ import annotations

from typing import Any

from dissectors import fuse as F
from dissectors.structs import Record

NODEID_FIELDS = frozenset({"newdir", "oldnodeid", "nodeid_out", "nodeid"})
FH_FIELDS = frozenset({"fh", "fh_in", "fh_out"})
DIR_OPS = frozenset({"READDIR", "READDIRPLUS"})


class Remap:
    """Recorded value -> the other side's value, learnt exchange by exchange."""

    def __init__(self) -> None:
        self.nodeid: dict[int, int] = {0: 0, 1: 1}
        self.fh: dict[int, int] = {}
        self.unique: dict[int, int] = {}
        self.cookie: dict[tuple[int, int], int] = {}  # (recorded fh, recorded dirent off) -> new off

    def learn(self, req: F.Request, old: Any, new: Any) -> None:
        """Both replies of one exchange (decoded; either may be None or an error)."""
        if not isinstance(old, F.Reply) or not isinstance(new, F.Reply) or old.error or new.error:
            return
        a, b = old.args, new.args
        if "entry" in a and "entry" in b:
            self._node(a["entry"].nodeid, b["entry"].nodeid)
        if "open" in a and "open" in b:
            self.fh[a["open"].fh] = b["open"].fh
        if "entries" in a and "entries" in b and req.opname in DIR_OPS:
            plus = req.opname == "READDIRPLUS"
            fh = req.args["read"].fh if "read" in req.args else 0
            if plus:  # nodeids by name
                theirs = {nm: rec for rec, nm in b["entries"]}
                for rec, nm in a["entries"]:
                    other = theirs.get(nm)
                    if other is not None and rec.entry_out.nodeid and other.entry_out.nodeid:
                        self._node(rec.entry_out.nodeid, other.entry_out.nodeid)
            # A cookie means "so many entries read": each back-end lists in its own order, so the one after
            # the k-th entry maps to the other's after its k-th (the set compares equal when both are whole).
            for (rec, _), (other, _) in zip(a["entries"], b["entries"], strict=False):
                self.cookie[(fh, rec.dirent.off if plus else rec.off)] = other.dirent.off if plus else other.off

    def _node(self, old: int, new: int) -> None:
        if old:
            self.nodeid[old] = new

    def request(self, req: F.Request, unique: int) -> F.Request:
        """The recorded request as the other back-end must see it, under a fresh `unique`."""
        self.unique[req.unique] = unique
        h = req.header._replace(unique=unique, nodeid=self.nodeid.get(req.nodeid, req.nodeid))
        args = {k: self._value(v, req) for k, v in req.args.items()}
        return F.Request(h, req.op, args, req.ext, req.raw_len, req.captured)

    def _value(self, v: Any, req: F.Request) -> Any:
        if isinstance(v, Record):
            return self._record(v, req)
        if isinstance(v, list):
            return [self._value(x, req) for x in v]
        return v

    def _record(self, rec: Record, req: F.Request) -> Record:
        kw: dict[str, Any] = {}
        for name in rec._fields:
            val = getattr(rec, name)
            if name in FH_FIELDS:
                kw[name] = self.fh.get(val, val)
            elif name in NODEID_FIELDS:
                kw[name] = self.nodeid.get(val, val)
            elif name == "unique" and req.opname == "INTERRUPT":
                kw[name] = self.unique.get(val, val)
            elif name == "offset" and req.opname in DIR_OPS and val:
                kw[name] = self.cookie.get((rec.fh, val), val)
            elif isinstance(val, Record):
                kw[name] = self._record(val, req)
        return rec._replace(**kw) if kw else rec
