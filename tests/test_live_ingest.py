"""The UI's fast ingest path agrees with the full Analyzer, on real guest traffic.

The source side is what a proxy runs: a full Analyzer (every message decoded when fed) publishing into a
real Hub.  The client side is what `fsinspect attach` runs: the UI's AttachSource over the binary stream,
with the block scanner (C, and the pure-Python twin) and the lazy Analyzer (bodies decoded only for the ops
that change state, or when shown).  Their stats, inode map, paths, submounts, SYNCFS records and lints must
be equal, and every exchange must decode to the same fields once it is looked at.  (`stuck` is the source's
verdict on a live stream, with its own clock, so both sides run without it here.)
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fsinspect.analysis import Analyzer
from fsinspect.analysis.exchange import LazyExchange
from fsinspect.analysis.render import exchange_json
from fsinspect.live.hub import Hub
from fsinspect.recording import reader as rreader
from fsinspect.recording.reader import RecordingReader
from fsinspect.recording.scan import scan_python
from fsinspect.tui.sources import AttachSource, Store
from tests.test_tui import SYNCFS, WORKLOAD

try:
    from fsinspect.recording import _scan  # type: ignore[attr-defined]
    SCANNERS = {"c": _scan.scan, "python": scan_python}
except ImportError:
    SCANNERS = {"python": scan_python}


def state_of(an: Analyzer) -> dict[str, Any]:
    """Everything the analysis keeps besides the exchanges, with lints named by exchange number."""
    n_of = {ex.index: ex.n for ex in an.exchanges}
    nodes = {k: (v.parent, v.name, v.ino, v.generation, v.nlookup, v.attr_flags) for k, v in an.inodes.nodes.items()}
    return {"stats": an.stats.as_dict(), "nodes": nodes, "paths": {k: an.inodes.path(k) for k in nodes},
            "submounts": {k: (a.parent, a.name, a.ino) for k, a in an.submounts.announced.items()},
            "syncfs": [(n_of.get(r.exchange), r.nodeid, r.latency_ns, r.is_root, r.error, r.path)
                       for r in an.submounts.syncfs],
            "lints": [(lint.name, n_of.get(lint.exchange), lint.message) for lint in an.lints],
            "epoch": an.epoch, "count": an.count}


def _view(ex: Any) -> dict[str, Any]:
    d = exchange_json(ex)
    d.pop("index")
    return d


def through_the_ui(tmp_path: Path, recording: Path) -> tuple[Analyzer, Store]:
    """Publish `recording` through a full Analyzer into a real Hub while the UI's source is attached."""
    lock = threading.RLock()
    hub = Hub(str(tmp_path / "ctl.sock"), lambda: {}, feed_lock=lock, queue_len=1_000_000)
    store = Store()
    src = AttachSource(store, hub.path)
    src.connect()
    src.start()
    deadline = time.monotonic() + 30
    while not (hub.clients and all(c.binary for c in hub.clients)):
        assert time.monotonic() < deadline, "the UI never asked for the binary stream"
        time.sleep(0.01)
    ref = Analyzer(keep_exchanges=True, keep_raw=True, stuck_ns=0)  # the source side: every message decoded
    ref.pending_listeners.append(hub.publish_request)
    ref.listeners.append(hub.publish_exchange)
    hints: dict[int, str] = {}  # the path of each request's nodeid when it came, by exchange number
    with RecordingReader(recording) as r:
        for rec in r.records():
            if rec.is_fuse:
                with lock:
                    if rec.inbound:
                        nodeid = int.from_bytes(rec.data[16:24], "little")
                        hint = ref.inodes.path(nodeid) if nodeid in ref.inodes.nodes else ""
                        hints[ref.feed_request(rec.data, rec.queue, rec.head, rec.ts_ns, orig_len=rec.orig_len).n] = hint
                    else:
                        ref.feed_reply(rec.data, rec.queue, rec.head, rec.ts_ns, orig_len=rec.orig_len)
    hub.close()
    src.join(60)
    assert not src.thread.is_alive() and src.streaming == "pcapng" and store.overflow == 0
    ref.hints = hints  # type: ignore[attr-defined]
    return ref, store


def check_same(ref: Analyzer, store: Store) -> None:
    an = store.analyzer
    assert an.lazy and any(isinstance(ex, LazyExchange) for ex in an.exchanges)
    lazy_before = sum(isinstance(ex, LazyExchange) and ex.req_todo for ex in an.exchanges)
    assert state_of(an) == state_of(ref)  # before any row is looked at: state from the headers + state ops
    assert lazy_before == sum(isinstance(ex, LazyExchange) and ex.req_todo for ex in an.exchanges)
    assert [_view(ex) for ex in an.exchanges] == [_view(ex) for ex in ref.exchanges]  # each decoded now
    hints = ref.hints  # type: ignore[attr-defined]
    assert [store.path(ex.index) for ex in an.exchanges] == [hints.get(ex.n, "") for ex in ref.exchanges]
    assert sum(bool(h) for h in hints.values()) > len(hints) // 2


@pytest.mark.parametrize("scanner", sorted(SCANNERS))
@pytest.mark.parametrize("sample", [SYNCFS, WORKLOAD], ids=["guest-syncfs", "fusedev-workload"])
def test_the_fast_path_equals_the_full_analyzer(tmp_path: Path, sample: Path, scanner: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rreader, "scan", SCANNERS[scanner])
    ref, store = through_the_ui(tmp_path, sample)
    assert len(ref.exchanges) > 50 and ref.inodes.nodes and ref.stats.total
    check_same(ref, store)


@pytest.mark.guest
@pytest.mark.root
def test_the_fast_path_equals_the_full_analyzer_on_the_full_guest_workload(tmp_path: Path, guest_image: Any,
                                                                           guest_share: Any) -> None:
    """The `full` workload (~25k exchanges: LOOKUP, CREATE, READDIRPLUS, FORGET, SYNCFS on submounts...)
    recorded through the proxy from a real guest, then streamed to the UI."""
    from tests.guest_fixtures import explain
    from tests.test_proxy_e2e import boot, proxy_in_front

    with proxy_in_front(guest_share, tmp_path) as run:
        res = boot(guest_image, run, "full", timeout=600)
        assert res.ok, explain(res)
    ref, store = through_the_ui(tmp_path, run.record)
    assert len(ref.exchanges) > 10_000
    check_same(ref, store)


def test_state_ops_are_decoded_only_when_their_state_needs_it() -> None:
    """Lazy: a LOOKUP answered ENOENT, a SYNCFS, a GETATTR of a node whose ino is known stay undecoded; a
    LOOKUP that names a node and a GETATTR of the root (ino unknown) are decoded when their reply comes; the
    inode map, stats and lints are the eager analyzer's."""
    from dissectors import fuse as F

    attr = F.make("fuse_attr", ino=77, mode=0o100644, nlink=1)
    entry = F.make("fuse_entry_out", nodeid=5, generation=1, attr=attr)
    root_attr = F.make("fuse_attr_out", attr=F.make("fuse_attr", ino=2, mode=0o40755, nlink=2))
    msgs = [
        (F.encode_request("LOOKUP", {"name": b"gone"}, unique=1, nodeid=1), F.encode_reply("LOOKUP", unique=1, error=2)),
        (F.encode_request("LOOKUP", {"name": b"f"}, unique=2, nodeid=1), F.encode_reply("LOOKUP", {"entry": entry}, unique=2)),
        (F.encode_request("GETATTR", {"getattr": F.make("fuse_getattr_in")}, unique=3, nodeid=5),
         F.encode_reply("GETATTR", {"attr_out": F.make("fuse_attr_out", attr=attr)}, unique=3)),
        (F.encode_request("GETATTR", {"getattr": F.make("fuse_getattr_in")}, unique=4, nodeid=1),
         F.encode_reply("GETATTR", {"attr_out": root_attr}, unique=4)),
        (F.encode_request("SYNCFS", {"syncfs": F.make("fuse_syncfs_in")}, unique=5, nodeid=1),
         F.encode_reply("SYNCFS", unique=5)),
    ]
    eager, lazy = Analyzer(stuck_ns=0), Analyzer(lazy=True, keep_raw=True, stuck_ns=0)
    for an in (eager, lazy):
        for k, (rq, rp) in enumerate(msgs):
            an.feed_request(rq, 1, k, 1000 + k)
            an.feed_reply(rp, 1, k, 2000 + k)
    assert state_of(lazy) == state_of(eager)
    assert lazy.inodes.nodes[5].name == b"f" and lazy.inodes.nodes[1].ino == 2
    todo = [isinstance(ex, LazyExchange) and (ex.req_todo or ex.reply_todo) for ex in lazy.exchanges]
    assert todo == [True, False, True, False, True]
    assert [_view(ex) for ex in lazy.exchanges] == [_view(ex) for ex in eager.exchanges]  # decoded when read
