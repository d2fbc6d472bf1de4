"""What a rerun replays: the recording's negotiation and its first FUSE session, in request order.

The control plane gives the virtio features, the vhost-user protocol features and the queue sizes that
the front-end (QEMU) set; the analysis layer pairs the FUSE exchanges.  Each exchange keeps where its
request and reply sit in the file: a request may go to the back-end only once every reply recorded
before it has come back, which keeps the recording's overlap windows (and its causality) in the rerun.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dissectors import fuse as F
from dissectors import vhost_user as V
from dissectors.errors import DecodeError
from dissectors.ring.driver import F_WRITE
from dissectors.spec import fuse as fspec
from dissectors.spec import vhost_user as vspec

from ..analysis import Analyzer
from ..analysis.exchange import Exchange
from ..recording.reader import RecordingError, RecordingReader
from ..recording.replay import feed_records
from .front import Negotiation

_FE = vspec.FRONTEND_REQUEST.by_name()
SET_FEATURES, SET_PROTOCOL_FEATURES = _FE["SET_FEATURES"], _FE["SET_PROTOCOL_FEATURES"]
SET_VRING_NUM = _FE["SET_VRING_NUM"]
INIT = fspec.OPCODE.by_name()["INIT"]


class PlanError(Exception):
    """The recording can't be rerun; one line for the user."""


@dataclass
class Plan:
    path: str
    negotiation: Negotiation
    exchanges: list[Exchange]  # the first session, in request order, INIT first
    context: F.FuseContext  # the recorded INIT's (both sides), to encode and decode the recorded messages
    sessions: int = 1
    truncated: str | None = None
    rooms: dict[int, int] = field(default_factory=dict)  # request offset -> the recorded reply buffer's size
    debugger: dict[int, list[str]] = field(default_factory=dict)  # record offset -> held/injected/rewritten
    warnings: list[str] = field(default_factory=list)

    @property
    def overlap(self) -> int:
        """The most requests the recording had in flight at once (answered ones, in file order)."""
        events = sorted([(e.req_ref, 1) for e in self.exchanges if e.replied and e.req_ref is not None]
                        + [(e.reply_ref, -1) for e in self.exchanges if e.replied and e.reply_ref is not None])
        most = now = 0
        for _, d in events:
            now += d
            most = max(most, now)
        return most

    @property
    def max_request(self) -> int:
        return max((e.req_len for e in self.exchanges), default=4096)

    @property
    def max_reply(self) -> int:
        return max([e.reply_len for e in self.exchanges] + list(self.rooms.values())
                   + [reply_room(e.request) for e in self.exchanges if e.request is not None])


SIZED = {"READ": "read", "READDIR": "read", "READDIRPLUS": "read", "GETXATTR": "getxattr",
         "LISTXATTR": "getxattr"}


def reply_room(req: F.Request | None) -> int:
    """The reply buffer Linux gives when the recording has no layout: header + `size` for the sized
    replies (READ, READDIR, xattrs; some back-ends fill all of it), else room for any fixed reply."""
    if req is None:
        return 4096
    part = SIZED.get(req.opname)
    if part is None or part not in req.args:
        return 4096
    size = int(req.args[part].size)
    return F.OUT_HEADER_SIZE + (size if size or part == "read" else 8)


def negotiation_of(reader: RecordingReader, path: str) -> tuple[Negotiation, Analyzer, dict[int, int],
                                                                    dict[int, list[str]]]:
    """Read the whole recording once: the front-end's last negotiation before FUSE traffic, and the exchanges."""
    neg = Negotiation(strict=True)
    rooms: dict[int, int] = {}
    debugger: dict[int, list[str]] = {}
    seen_features = False
    sizes: dict[int, int] = {}
    an = Analyzer(keep_exchanges=True)
    fuse_seen = False

    def records():  # type: ignore[no-untyped-def]
        nonlocal seen_features, fuse_seen
        for rec in reader.records():
            if rec.is_fuse:
                fuse_seen = True
                if rec.inbound and rec.layout:
                    rooms[rec.offset] = sum(ln for ln, fl in rec.layout if fl & F_WRITE)
                if rec.debugger:
                    debugger[rec.offset] = rec.debugger
                yield rec
                continue
            if fuse_seen or not rec.inbound:
                continue
            try:
                msg = V.decode_message(rec.data)
            except DecodeError:
                continue
            if msg.is_reply:
                continue
            if msg.request == SET_FEATURES:
                neg.features = int(msg.payload.u64)
                seen_features = True
            elif msg.request == SET_PROTOCOL_FEATURES:
                neg.protocol = int(msg.payload.u64)
            elif msg.request == SET_VRING_NUM:
                sizes[int(msg.payload.index)] = int(msg.payload.num)

    try:
        feed_records(an, records())
        an.finish()
    except RecordingError as e:
        raise PlanError(str(e)) from None
    if not seen_features:
        neg.strict = False  # nothing recorded to insist on
    if sizes:
        neg.queue_sizes = sizes
    return neg, an, rooms, debugger


def load(path: str, *, allow_truncated: bool = False, allow_snapped: bool = False) -> Plan:
    try:
        reader = RecordingReader(path)
    except RecordingError as e:
        raise PlanError(str(e)) from None
    try:
        neg, an, rooms, debugger = negotiation_of(reader, path)
    finally:
        reader.close()
    if reader.truncated and not allow_truncated:
        raise PlanError(f"{path}: {reader.truncated}; a rerun needs the whole recording "
                        "(--allow-truncated reruns what is complete)")
    exs = [e for e in an.exchanges if e.request is not None or e.req_ref is not None]
    first = next((i for i, e in enumerate(exs) if e.opcode == INIT and e.request is not None), None)
    if first is None:
        raise PlanError(f"{path}: no INIT request in the recording: a rerun starts the FUSE session the "
                        "way the recording did (record from before the guest mounts)")
    init = exs[first]
    epoch = init.epoch
    session = [e for e in exs[first:] if e.epoch == epoch]
    if reader.truncated:  # what lost its reply to the cut is not rerun: nothing to compare it with
        session = [e for e in session if e.replied or not e.expects_reply]
    sessions = len({e.epoch for e in exs if e.opcode == INIT})
    bad = next((e for e in session if e.request is None), None)
    if bad is not None:
        raise PlanError(f"{path}: exchange #{bad.n} has an undecodable request ({bad.decode_error}); "
                        "a rerun can't send it")
    snapped = next((e for e in session if e.snapped), None)
    n_snapped = sum(1 for e in session if e.snapped)
    if snapped is not None and not allow_snapped:
        raise PlanError(f"{path}: the request of #{snapped.n} ({snapped.opname}) was recorded snapped "
                        f"({snapped.request.captured if snapped.request else 0} of {snapped.req_len} bytes); "
                        "a rerun needs whole requests (record with --snaplen 0, or rerun with --allow-snapped "
                        "to write zeros for the missing bytes)")
    assert init.request is not None
    rep = init.reply if isinstance(init.reply, F.Reply) and not init.reply.error else None
    ctx = F.FuseContext.from_init(init.request.args["init"], rep.args["init_out"] if rep is not None else None)
    plan = Plan(path, neg, session, ctx, sessions, reader.truncated, rooms, debugger)
    if not neg.strict:
        plan.warnings.append("no negotiation in the recording's control plane: the rerun takes the defaults "
                             "the back-end offers")
    if sessions > 1:
        plan.warnings.append(f"the recording holds {sessions} FUSE sessions (the guest mounted again); "
                             "the rerun replays the first")
    if n_snapped:
        plan.warnings.append(f"{n_snapped} request(s) were recorded snapped: the rerun writes zeros for their "
                             "missing bytes, and data compares over what the recording kept")
    if first:
        plan.warnings.append(f"{first} exchange(s) before the first INIT are skipped")
    return plan
