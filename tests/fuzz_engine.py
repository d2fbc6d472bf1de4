"""A stateful, model-checked fuzz campaign for the daemon engine (in-process, no kernel, no QEMU).

A seeded generator plays a hostile kernel: it keeps a model of what the engine has handed out (nodeids with
their nlookup counts, open file and directory handles) and draws requests that mostly make sense in that
state -- INIT and re-INIT, LOOKUP of a small pool of colliding names, FORGET/BATCH_FORGET of counts the
kernel holds (and of more, of unknown nodeids), OPEN/RELEASE and OPENDIR/RELEASEDIR with handle reuse and
double release, CREATE/MKDIR/UNLINK/RMDIR, RENAME/RENAME2 across directories, READ/WRITE/READDIR on live
and stale handles, DESTROY -- then mutates a fraction of them (bit flips, truncation, lying lengths and
opcodes, hostile names), and mixes in requests crafted with scapy's fuzz() from the spec-generated layers
(dissectors.scapy).  The model follows what the engine actually answered, never what was meant.

Invariants checked after every request:
- nothing raises out of Server.handle;
- exactly one reply for every request that expects one (none for FORGET, BATCH_FORGET, INTERRUPT); the
  reply's length field is its size, its error is 0 or a negative errno, its unique is the request's, and it
  decodes as a reply to that request;
- the engine's inode table is exactly the model's (root plus every nodeid with nlookup > 0, same counts) and
  its handle table is the model's open handles; both stay under a bound (the generator forgets and releases
  when they grow, and now and then everything, as an unmount does: the table falls back to the root and the
  process's fd count to its baseline);
- nothing outside the shared directory changes (a canary directory beside it, checked every CHECK_EVERY
  cases and at the end).

SETLKW is answered from a lock-waiter thread, so a mutated opcode 33 is turned into SETLK (SETLKW has its own
tests in test_daemon_engine.py); dispatch is inline so every other reply is synchronous.
"""

from __future__ import annotations

import logging
import os
import random
import struct
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.passthrough import Options, PassthroughFS
from daemon.server import Server
from dissectors import fuse as F
from dissectors.errors import DecodeError
from dissectors.spec import fuse as spec

OP = {o.name: o.value for o in spec.OPCODES}
NO_REPLY = {OP["FORGET"], OP["BATCH_FORGET"], OP["INTERRUPT"]}
ENTRY_OPS = {OP[n] for n in ("LOOKUP", "MKDIR", "MKNOD", "SYMLINK", "LINK", "CREATE", "TMPFILE")}
OPEN_OPS = {OP[n] for n in ("OPEN", "CREATE", "TMPFILE", "OPENDIR")}
RELEASE_OPS = {OP["RELEASE"], OP["RELEASEDIR"]}
NAMES = [b"a", b"b", b"c", b"d", b"e"]
HOSTILE = [b"..", b".", b"a/b", b"../outside", b"../outside/canary", b"", b"\xff" * 300, b"x" * 255, b"/etc"]
MAX_NODES = 48  # the generator forgets when the model holds more
MAX_HANDLES = 24
CHECK_EVERY = 4096
MUTATE = 0.2
INIT_FLAGS = (1 << 64) - 1  # everything the kernel could offer: the engine narrows it
SETLKW, SETLK = OP["SETLKW"], OP["SETLK"]


def tree_snapshot(d: Path) -> list[tuple[str, int, int, int]]:
    out = []
    for root, dirs, files in os.walk(d):
        for n in dirs + files:
            s = os.lstat(os.path.join(root, n))
            out.append((os.path.join(root, n), s.st_mode, s.st_size, s.st_mtime_ns))
    return sorted(out)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Model:
    nodes: dict[int, int] = field(default_factory=dict)  # nodeid -> nlookup (the root is implicit)
    dirs: set[int] = field(default_factory=lambda: {1})
    files: dict[int, int] = field(default_factory=dict)  # fh -> nodeid (OPEN/CREATE)
    dirhandles: dict[int, int] = field(default_factory=dict)  # fh -> nodeid (OPENDIR)
    released: list[int] = field(default_factory=list)  # recently released fhs (handle reuse)
    initialised: bool = False

    def clear(self) -> None:
        self.nodes.clear()
        self.dirs = {1}
        self.files.clear()
        self.dirhandles.clear()


class BugLog(logging.Handler):
    """Collects what the engine logs: a record with a traceback is a bug in an op (the engine answered EIO and
    went on); the rest are the one-line complaints a hostile client may cause, kept off stderr."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bugs: list[str] = []
        self.lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += 1
        if record.exc_info:
            self.bugs.append(self.format(record))


@contextmanager
def engine_log() -> Iterator[BugLog]:
    logger = logging.getLogger("fsinspect.daemon")
    h = BugLog()
    old = logger.propagate
    logger.addHandler(h)
    logger.propagate = False
    try:
        yield h
    finally:
        logger.removeHandler(h)
        logger.propagate = old


class EngineCampaign:
    """One engine over a fresh shared dir (on tmpfs: fsync and syncfs cost nothing), a canary beside it."""

    def __init__(self, seed: int, *, scapy_pool: int = 256) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="fsi-engine-fuzz-", dir="/dev/shm"))
        self.shared, self.outside = self.base / "shared", self.base / "outside"
        self.shared.mkdir()
        (self.shared / "a").write_bytes(b"data")
        (self.shared / "d").mkdir()
        self.outside.mkdir()
        (self.outside / "canary").write_bytes(b"precious")
        self.canary = tree_snapshot(self.outside)
        self.fs = PassthroughFS(Options(str(self.shared), xattr=True))
        self.server = Server(self.fs, dispatch="inline")
        self.model = Model()
        self.rng = random.Random(seed)
        self.seed = seed
        self.unique = 0
        self.cases = 0
        self.replies: list[bytes] = []
        self.history: list[bytes] = []  # the last requests, for the failure message
        self.fd_base = fd_count()
        self.scapy = crafted_requests(self.rng, scapy_pool) if scapy_pool else []

    def opcounts(self) -> str:
        """What the engine served, by outcome: ops answered 0 and ops answered an error."""
        c = self.server.counters()
        ok = sum(c["ops"].values()) - sum(c["errors"].values())
        return f"{ok} ok, {sum(c['errors'].values())} errors over {len(c['ops'])} opcodes"

    def close(self) -> None:
        self.server.shutdown()
        self.fs.close()
        import shutil

        shutil.rmtree(self.base, ignore_errors=True)

    # ---------------------------------------------------------------- one case
    def step(self) -> None:
        raw = self.draw()
        self.cases += 1
        self.history = [*self.history[-7:], raw]
        self.send(raw)
        if self.cases % CHECK_EVERY == 0:
            self.check_outside()

    def send(self, raw: bytes) -> None:
        self.replies.clear()
        self.server.handle(raw, self._sink)
        try:
            req: F.Request | None = F.decode_request(raw, self.server.ctx)
        except DecodeError:
            req = None
        opcode = struct.unpack_from("<I", raw, 4)[0] if len(raw) >= 8 else -1
        if req is None:
            # Undecodable: the engine answers with an error when it can read a unique, else drops it.
            assert len(self.replies) <= 1, self.fail(f"{len(self.replies)} replies to an undecodable request")
            if self.replies:
                self._check_reply(raw, self.replies[0], None)
                assert self._error(self.replies[0]) < 0, self.fail("success for an undecodable request")
            return
        if opcode in NO_REPLY:
            assert not self.replies, self.fail(f"a reply to {req.opname}")
        else:
            assert len(self.replies) == 1, self.fail(f"{len(self.replies)} replies to {req.opname}")
            rep = self._check_reply(raw, self.replies[0], req)
            self.follow(req, rep)
        if opcode == OP["FORGET"] and self.model.initialised:
            self.forget(req.nodeid, req.args["forget"].nlookup)
        elif opcode == OP["BATCH_FORGET"] and self.model.initialised:
            for one in req.args["forgets"]:
                self.forget(one.nodeid, one.nlookup)
        self.check_tables()

    def _sink(self, parts: Sequence[Any]) -> None:
        self.replies.append(b"".join(bytes(p) for p in parts))

    @staticmethod
    def _error(rep: bytes) -> int:
        return int(struct.unpack_from("<i", rep, 4)[0])

    def _check_reply(self, raw: bytes, rep: bytes, req: F.Request | None) -> F.Reply | None:
        assert len(rep) >= 16, self.fail(f"a {len(rep)}-byte reply")
        ln, err, unique = struct.unpack_from("<IiQ", rep)
        assert ln == len(rep), self.fail(f"reply length field {ln} for {len(rep)} bytes")
        assert -4096 < err <= 0, self.fail(f"reply error {err}")
        assert unique == struct.unpack_from("<Q", raw, 8)[0], self.fail(f"reply unique {unique}")
        if req is None:
            return None
        try:
            out = F.decode_reply(rep, req, self.server.ctx)
        except DecodeError as e:
            raise AssertionError(self.fail(f"the reply to {req.opname} does not decode: {e}")) from None
        assert isinstance(out, F.Reply)
        return out

    # ---------------------------------------------------------------- the model follows the engine
    def follow(self, req: F.Request, rep: F.Reply | None) -> None:
        m = self.model
        op = req.opcode
        if rep is None:
            return
        if op == OP["INIT"]:
            if rep.error == 0:
                m.initialised = True
            return
        if op == OP["DESTROY"]:
            if rep.error == 0:
                m.clear()
                m.initialised = False
            return
        if rep.error:
            return
        entries = [rep.args["entry"]] if op in ENTRY_OPS else \
            [rec.entry_out for rec, _name in rep.args["entries"]] if op == OP["READDIRPLUS"] else []
        for e in entries:  # each entry with a nodeid is one more lookup the kernel holds (the root: never forgotten)
            if e.nodeid > 1:
                m.nodes[e.nodeid] = m.nodes.get(e.nodeid, 0) + 1
                if (e.attr.mode & 0o170000) == 0o040000:
                    m.dirs.add(e.nodeid)
        if op in OPEN_OPS:
            fh = rep.args["open"].fh
            (m.dirhandles if op == OP["OPENDIR"] else m.files)[fh] = req.nodeid
        elif op in RELEASE_OPS:
            fh = req.args["release"].fh
            if m.files.pop(fh, None) is not None or m.dirhandles.pop(fh, None) is not None:
                m.released = [*m.released[-7:], fh]

    def forget(self, nodeid: int, n: int) -> None:
        m = self.model
        if nodeid in m.nodes:
            m.nodes[nodeid] = max(0, m.nodes[nodeid] - n)
            if m.nodes[nodeid] == 0:
                del m.nodes[nodeid]
                m.dirs.discard(nodeid)

    def check_tables(self) -> None:
        store = self.fs.store
        got = {nid: ino.nlookup for nid, ino in store._by_id.items() if nid != 1}
        assert got == self.model.nodes, self.fail(f"inode table {got} != model {self.model.nodes}")
        handles = set(self.fs._handles)
        want = set(self.model.files) | set(self.model.dirhandles)
        assert handles == want, self.fail(f"handles {sorted(handles)} != model {sorted(want)}")
        # A READDIRPLUS adds one lookup per entry at once: the bound leaves room for a full directory.
        assert len(got) <= MAX_NODES + 64 and len(handles) <= 2 * MAX_HANDLES, self.fail("tables unbounded")

    def check_outside(self) -> None:
        assert tree_snapshot(self.outside) == self.canary, self.fail("something outside the share changed")

    def settle(self) -> None:
        """Release every handle and forget every nodeid (an unmount): the engine holds the root alone and the
        process has no fd more than at the start."""
        m = self.model
        for fh in list(m.files):
            self.send(self.encode("RELEASE", {"release": F.make("fuse_release_in", fh=fh)}, m.files[fh]))
        for fh in list(m.dirhandles):
            self.send(self.encode("RELEASEDIR", {"release": F.make("fuse_release_in", fh=fh)}, m.dirhandles[fh]))
        for nid, n in list(m.nodes.items()):
            self.send(self.encode("FORGET", {"forget": F.make("fuse_forget_in", nlookup=n)}, nid))
        assert len(self.fs.store) == 1 and not self.fs._handles, self.fail("tables not empty after settle")
        assert fd_count() <= self.fd_base, self.fail(f"fds {fd_count()} > {self.fd_base} at the start")
        self.check_outside()

    def fail(self, what: str) -> str:
        hist = " | ".join(r[:64].hex() for r in self.history[-4:])
        return f"engine fuzz seed {self.seed} case {self.cases}: {what}; last requests: {hist}"

    # ---------------------------------------------------------------- the generator
    def encode(self, op: str, args: dict[str, Any] | None, nodeid: int, uid: int = 0) -> bytes:
        self.unique += 1
        return F.encode_request(op, args, unique=self.unique, nodeid=nodeid, uid=uid, gid=0, pid=1,
                                ctx=self.server.ctx)

    def draw(self) -> bytes:
        r = self.rng
        m = self.model
        if not m.initialised or r.random() < 0.002:
            raw = self.encode("INIT", {"init": F.make("fuse_init_in", major=7, minor=r.choice((31, 38, 45)),
                                                      max_readahead=1 << 17, flags=INIT_FLAGS & 0xFFFFFFFF,
                                                      flags2=INIT_FLAGS >> 32)}, 0)
            return raw
        if self.scapy and r.random() < 0.03:
            raw = bytearray(r.choice(self.scapy))
            self.unique += 1
            struct.pack_into("<QQ", raw, 8, self.unique, self.node(any_kind=True))
            return self.mutate(raw) if r.random() < MUTATE else bytes(raw)
        if len(m.nodes) > MAX_NODES or len(m.files) + len(m.dirhandles) > MAX_HANDLES:
            raw = self.cleanup()
        else:
            raw = self.request()
        return self.mutate(bytearray(raw)) if r.random() < MUTATE else raw

    def node(self, any_kind: bool = False, want_dir: bool = False) -> int:
        r = self.rng
        m = self.model
        x = r.random()
        if x < 0.03:
            return r.choice((0, 99999, 2**64 - 1, max(m.nodes, default=1) + 1))  # unknown and absurd nodeids
        pool = sorted(m.dirs) if want_dir and not any_kind else [1, *m.nodes]
        return r.choice(pool)

    def name(self) -> bytes:
        r = self.rng
        return r.choice(HOSTILE) if r.random() < 0.05 else r.choice(NAMES)

    def fh(self, dirs: bool = False) -> int:
        r = self.rng
        m = self.model
        live = list(m.dirhandles if dirs else m.files)
        x = r.random()
        if x < 0.15 and m.released:
            return r.choice(m.released)  # a released handle used again
        if x < 0.2 or not live:
            return r.choice((0, 12345, 2**64 - 1))
        return r.choice(live)

    def cleanup(self) -> bytes:
        r = self.rng
        m = self.model
        # Over a bound the generator only shrinks the tables (else opens random-walk past it).
        if len(m.files) + len(m.dirhandles) > MAX_HANDLES and (m.files or m.dirhandles):
            pool = m.files if m.files and (not m.dirhandles or r.random() < 0.5) else m.dirhandles
            fh = r.choice(list(pool))
            op = "RELEASE" if pool is m.files else "RELEASEDIR"
            return self.encode(op, {"release": F.make("fuse_release_in", fh=fh)}, pool[fh])
        if len(m.nodes) > MAX_NODES:
            return self.forget_some()
        if m.files and r.random() < 0.5:
            fh = r.choice(list(m.files))
            return self.encode("RELEASE", {"release": F.make("fuse_release_in", fh=fh)}, m.files[fh])
        if m.dirhandles and r.random() < 0.5:
            fh = r.choice(list(m.dirhandles))
            return self.encode("RELEASEDIR", {"release": F.make("fuse_release_in", fh=fh)}, m.dirhandles[fh])
        if len(m.nodes) > MAX_NODES // 2:
            return self.forget_some()
        return self.request()

    def forget_some(self) -> bytes:
        items = self.rng.sample(sorted(self.model.nodes.items()), min(len(self.model.nodes), self.rng.randint(1, 16)))
        forgets = [F.make("fuse_forget_one", nodeid=nid, nlookup=n) for nid, n in items]
        return self.encode("BATCH_FORGET", {"batch": F.make("fuse_batch_forget_in", count=len(forgets)),
                                            "forgets": forgets}, 0)

    def request(self) -> bytes:
        r = self.rng
        m = self.model
        op = r.choices(GEN_OPS, GEN_WEIGHTS)[0]
        uid = 65534 if r.random() < 0.05 else 0
        if op == "LOOKUP":
            return self.encode(op, {"name": self.name()}, self.node(want_dir=True), uid)
        if op == "FORGET":
            nid = self.node(any_kind=True)
            n = m.nodes.get(nid, 1)
            n = r.choice((1, n, n + 1, 2**64 - 1)) if r.random() < 0.1 else r.randint(1, max(1, n))
            return self.encode(op, {"forget": F.make("fuse_forget_in", nlookup=n)}, nid)
        if op == "BATCH_FORGET":
            forgets = [F.make("fuse_forget_one", nodeid=self.node(any_kind=True), nlookup=r.randint(1, 3))
                       for _ in range(r.randint(0, 6))]
            return self.encode(op, {"batch": F.make("fuse_batch_forget_in", count=len(forgets)),
                                    "forgets": forgets}, 0)
        if op in ("GETATTR", "READLINK", "STATFS", "LISTXATTR"):
            args: dict[str, Any] = {}
            if op == "GETATTR":
                fh = self.fh() if r.random() < 0.3 else 0
                args = {"getattr": F.make("fuse_getattr_in", getattr_flags=1 if fh else 0, fh=fh)}
            elif op == "LISTXATTR":
                args = {"getattr": F.make("fuse_getxattr_in", size=r.choice((0, 4096)))}
            return self.encode(op, args, self.node(any_kind=True), uid)
        if op in ("OPEN", "OPENDIR"):
            flags = r.choice((os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_RDWR | os.O_APPEND,
                              os.O_DIRECTORY))
            return self.encode(op, {"open": F.make("fuse_open_in", flags=flags)},
                               self.node(want_dir=op == "OPENDIR"), uid)
        if op in ("RELEASE", "RELEASEDIR", "FLUSH", "FSYNC", "FSYNCDIR"):
            dirs = op in ("RELEASEDIR", "FSYNCDIR")
            fh = self.fh(dirs=dirs)
            nid = (m.dirhandles if dirs else m.files).get(fh, self.node(any_kind=True))
            if op.startswith("RELEASE"):
                return self.encode(op, {"release": F.make("fuse_release_in", fh=fh)}, nid)
            if op == "FLUSH":
                return self.encode(op, {"flush": F.make("fuse_flush_in", fh=fh)}, nid)
            return self.encode(op, {"fsync": F.make("fuse_fsync_in", fh=fh, fsync_flags=r.randint(0, 1))}, nid)
        if op in ("READ", "READDIR", "READDIRPLUS"):
            fh = self.fh(dirs=op != "READ")
            nid = (m.files if op == "READ" else m.dirhandles).get(fh, self.node(any_kind=True))
            rd = F.make("fuse_read_in", fh=fh, offset=r.choice((0, 0, 1, 3, 4096, 2**63 - 1)),
                        size=r.choice((0, 1, 4096, 131072)))
            return self.encode(op, {"read": rd}, nid, uid)
        if op == "WRITE":
            fh = self.fh()
            data = r.randbytes(r.choice((0, 1, 17, 512)))
            w = F.make("fuse_write_in", fh=fh, offset=r.choice((0, 5, 4096)), size=len(data))
            return self.encode(op, {"write": w, "data": data}, m.files.get(fh, self.node(any_kind=True)), uid)
        if op == "CREATE":
            c = F.make("fuse_create_in", flags=r.choice((os.O_RDWR, os.O_RDWR | os.O_EXCL, os.O_WRONLY | os.O_TRUNC)),
                       mode=0o100644, umask=0o022)
            return self.encode(op, {"create": c, "name": self.name()}, self.node(want_dir=True), uid)
        if op == "MKDIR":
            return self.encode(op, {"mkdir": F.make("fuse_mkdir_in", mode=0o40755, umask=0o022),
                                    "name": self.name()}, self.node(want_dir=True), uid)
        if op == "SYMLINK":
            return self.encode(op, {"name": self.name(), "target": r.choice((b"a", b"../outside/canary", b"/"))},
                               self.node(want_dir=True), uid)
        if op == "LINK":
            return self.encode(op, {"link": F.make("fuse_link_in", oldnodeid=self.node(any_kind=True)),
                                    "newname": self.name()}, self.node(want_dir=True), uid)
        if op in ("UNLINK", "RMDIR"):
            return self.encode(op, {"name": self.name()}, self.node(want_dir=True), uid)
        if op in ("RENAME", "RENAME2"):
            if op == "RENAME":
                ren = F.make("fuse_rename_in", newdir=self.node(want_dir=True))
            else:
                ren = F.make("fuse_rename2_in", newdir=self.node(want_dir=True), flags=r.choice((0, 1, 2, 4, 7)))
            return self.encode(op, {"rename": ren, "name": self.name(), "newname": self.name()},
                               self.node(want_dir=True), uid)
        if op == "SETATTR":
            sa = F.make("fuse_setattr_in", valid=r.choice((1, 8, 16, 48, 0x1FF)), mode=0o100600,
                        size=r.choice((0, 10, 4096)), fh=self.fh(), uid=r.choice((0, 65534)), gid=0)
            return self.encode(op, {"setattr": sa}, self.node(any_kind=True), uid)
        if op == "DESTROY":
            return self.encode(op, {}, 0)
        if op == "INTERRUPT":
            return self.encode(op, {"interrupt": F.make("fuse_interrupt_in", unique=r.randint(0, self.unique))}, 0)
        raise AssertionError(op)

    def mutate(self, b: bytearray) -> bytes:
        r = self.rng
        for _ in range(r.randint(1, 3)):
            k = r.random()
            if k < 0.35 and len(b) > 40:
                b[r.randrange(40, len(b))] = r.randrange(256)  # a flipped argument byte
            elif k < 0.5:
                del b[r.randint(0, len(b)):]  # truncated
            elif k < 0.6 and len(b) >= 4:
                struct.pack_into("<I", b, 0, r.choice((0, 1, 39, 40, len(b) + 1, len(b) - 1, 2**32 - 1)))
            elif k < 0.7 and len(b) >= 8:
                struct.pack_into("<I", b, 4, r.choice(OPCODE_VALUES))  # another op's header on these args
            elif k < 0.8 and len(b) >= 40:
                struct.pack_into("<H", b, 36, r.randrange(0x10000))  # total_extlen
            elif k < 0.9 and len(b) >= 24:
                struct.pack_into("<Q", b, 16, r.choice((0, 1, 2**64 - 1, r.randrange(2**64))))  # nodeid
            else:
                b += r.randbytes(r.randint(1, 24))
                if len(b) >= 4 and r.random() < 0.5:
                    struct.pack_into("<I", b, 0, len(b))
        if len(b) >= 8 and struct.unpack_from("<I", b, 4)[0] == SETLKW:
            struct.pack_into("<I", b, 4, SETLK)
        return bytes(b)


GEN = {"LOOKUP": 20, "FORGET": 6, "BATCH_FORGET": 2, "GETATTR": 6, "READLINK": 1, "STATFS": 1, "LISTXATTR": 1,
       "OPEN": 7, "OPENDIR": 4, "RELEASE": 6, "RELEASEDIR": 3, "FLUSH": 1, "FSYNC": 1, "FSYNCDIR": 1, "READ": 4,
       "READDIR": 2, "READDIRPLUS": 2, "WRITE": 4, "CREATE": 5, "MKDIR": 3, "SYMLINK": 1, "LINK": 2, "UNLINK": 3,
       "RMDIR": 2, "RENAME": 3, "RENAME2": 2, "SETATTR": 2, "DESTROY": 0.05, "INTERRUPT": 0.5}
GEN_OPS = list(GEN)
GEN_WEIGHTS = list(GEN.values())
OPCODE_VALUES = [o.value for o in spec.OPCODES if o.value != SETLKW]


def crafted_requests(rng: random.Random, n: int) -> list[bytes]:
    """`n` requests of random opcodes with random field values, from the scapy layers' fuzz() (seeded)."""
    from scapy.packet import fuzz as scapy_fuzz

    import dissectors.scapy as S

    state = random.getstate()
    random.seed(rng.random())  # scapy's random values come from the random module
    try:
        out = []
        ops = [op for op in spec.OPCODES if op.value in S.REQUEST_LAYERS and op.value != SETLKW]
        for _ in range(n):
            op = rng.choice(ops)
            out.append(bytes(S.FuseIn(unique=1) / scapy_fuzz(S.REQUEST_LAYERS[op.value]())))
        return out
    finally:
        random.setstate(state)
