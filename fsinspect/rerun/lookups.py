"""The lookups the back-end under test granted, so a rerun never gives back more than it got.

A recording's FORGET counts are what the recorded back-end granted.  The back-end under test may grant
fewer (a LOOKUP that failed here, a READDIRPLUS that listed in another order, a nodeid the remap never
learnt): replayed verbatim, such a FORGET drives its count below zero, which the C virtiofsd answers with
an assertion and an abort.  So each given-back count is clamped to what this back-end granted, and every
clamp is reported (a note in the summary), never done silently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dissectors import fuse as F
from dissectors.spec import fuse as fspec


def forgets(req: F.Request) -> list[tuple[int, int]]:
    """(nodeid, nlookup) a FORGET or BATCH_FORGET gives back; [] for any other request."""
    if req.opname == "FORGET":
        return [(req.nodeid, int(req.args["forget"].nlookup))]
    if req.opname == "BATCH_FORGET":
        return [(int(one.nodeid), int(one.nlookup)) for one in req.args.get("forgets", ())]
    return []


def granted(opname: str, reply: Any) -> list[int]:
    """Nodeids a reply grants one lookup each (the spec's GRANTS_LOOKUP; nodeid 0 grants nothing)."""
    if opname not in fspec.GRANTS_LOOKUP or not isinstance(reply, F.Reply) or reply.error:
        return []
    if "entry" in reply.args:
        ids = [int(reply.args["entry"].nodeid)]
    else:
        ids = [int(rec.entry_out.nodeid) for rec, _ in reply.args.get("entries", ())]
    return [n for n in ids if n]


@dataclass
class Lookups:
    """nlookup per nodeid (the back-end's numbering) that the back-end granted and nobody gave back yet."""

    held: Counter[int] = field(default_factory=Counter)
    adjusted: list[str] = field(default_factory=list)  # one line per clamped or skipped forget entry
    withheld: int = 0  # nlookup the recording gave back that the rerun did not

    def grant(self, opname: str, reply: Any) -> None:
        for n in granted(opname, reply):
            self.held[n] += 1

    def give_back(self, req: F.Request, what: str, mapped: Callable[[int], bool] = lambda _: True) -> F.Request | None:
        """`req` (already remapped) with each entry clamped to what was granted; None when nothing is left.
        `what` names the exchange in the adjustment notes; an entry whose recorded nodeid the remap never
        learnt (`mapped` false for its position) names no node of this back-end, whatever its number."""
        kept: list[tuple[int, int]] = []
        for k, (nodeid, want) in enumerate(forgets(req)):
            n = min(want, self.held[nodeid]) if mapped(k) else 0
            if n:
                self.held[nodeid] -= n
                if not self.held[nodeid]:
                    del self.held[nodeid]
                kept.append((nodeid, n))
            if n < want:
                self.withheld += want - n
                self.adjusted.append(f"{what} nodeid {nodeid}: nlookup {want} recorded, " + (
                    f"the back-end granted {n}" + (f"; sent {n}" if n else "; not sent") if mapped(k) else
                    "a node the recording never mapped to one of this back-end's; not sent"))
        if kept == forgets(req):
            return req
        if not kept:
            return None
        if req.opname == "FORGET":
            return F.Request(req.header, req.op, {"forget": req.args["forget"]._replace(nlookup=kept[0][1])},
                             req.ext)
        ones = [F.make("fuse_forget_one", nodeid=i, nlookup=n) for i, n in kept]
        args = dict(req.args, batch=req.args["batch"]._replace(count=len(ones)), forgets=ones)
        return F.Request(req.header, req.op, args, req.ext)

    def note(self) -> str:
        """The summary's note, or '' when every forget went as recorded."""
        if not self.adjusted:
            return ""
        return (f"{len(self.adjusted)} FORGET/BATCH_FORGET entr{'y' if len(self.adjusted) == 1 else 'ies'} gave "
                f"back more lookups than this back-end granted ({self.withheld} nlookup in all): clamped to its "
                "grants, so the rerun never underflows its counts (the replies that granted fewer differ above, "
                "or the nodes mapped differently)")
