"""The transport-agnostic FUSE engine: decode -> `FileSystem` method -> encode.

Modelled on the Rust virtiofsd `server.rs` + `filesystem.rs`: one dispatch on the opcode decodes the
arguments, calls the filesystem method and encodes the reply.  `FileSystem` answers ENOSYS for every op,
so a filesystem implements only what it supports.

Transports call `Server.handle(request_bytes, reply, queue)`; `reply` receives one whole reply as a list
of buffers (iovecs), possibly from another thread.  Concurrency model: requests are handled inline on
the transport's thread (one per queue for virtio-fs, the reader thread(s) for /dev/fuse), except the ops
that can block for long (READ, WRITE, fsync, syncfs, ...), which go to a thread pool so they never stall
unrelated requests.  virtiofsd found inline-per-queue faster than a plain pool; `dispatch="pool"`
exists to measure that choice.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from daemon.lockwait import LockWaiters
from dissectors import fuse as F
from dissectors.errors import DecodeError
from dissectors.spec import fuse as spec

from .hold import EngineHoldPoint

log = logging.getLogger("fsinspect.daemon")

Buffer = bytes | bytearray | memoryview
ReplySink = Callable[[Sequence[Buffer]], object]  # a return value is ignored (Chain.reply gives its length)
# tap(direction, queue, unique, ts_ns, raw): direction is "request" or "reply", with a debugger verdict
# after a colon where one applies: "request:held", "reply:held", "reply:answered", "reply:rewritten",
# "reply:safety" (EIO for a request still held when the engine stops; daemon/hold.py).  Taps test
# `direction.startswith("request")`.
Tap = Callable[[str, int, int, int, bytes], None]

INIT_FLAG = spec.INIT_FLAGS.by_name()
MIN_KERNEL_MINOR = 27
MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // 4096
GETATTR_FH = spec.GETATTR_FLAGS.by_name()["FH"]
FSYNC_FDATASYNC = spec.FSYNC_FLAGS.by_name()["FDATASYNC"]
LK_FLOCK = spec.LK_FLAGS.by_name()["FLOCK"]
OP = {o.name: o.value for o in spec.OPCODES}

# What the engine itself can carry; the filesystem narrows it in FileSystem.init().
ENGINE_FLAGS = (
    INIT_FLAG["ASYNC_READ"] | INIT_FLAG["BIG_WRITES"] | INIT_FLAG["ATOMIC_O_TRUNC"] | INIT_FLAG["MAX_PAGES"]
    | INIT_FLAG["DO_READDIRPLUS"] | INIT_FLAG["READDIRPLUS_AUTO"] | INIT_FLAG["PARALLEL_DIROPS"]
    | INIT_FLAG["ASYNC_DIO"] | INIT_FLAG["AUTO_INVAL_DATA"] | INIT_FLAG["WRITEBACK_CACHE"]
    | INIT_FLAG["SUBMOUNTS"] | INIT_FLAG["FLOCK_LOCKS"] | INIT_FLAG["POSIX_LOCKS"] | INIT_FLAG["CREATE_SUPP_GROUP"]
    | INIT_FLAG["PASSTHROUGH"]
)
FOPEN_PASSTHROUGH = spec.FOPEN.by_name()["PASSTHROUGH"]
EXT_GROUPS = spec.EXT_TYPE.by_name()["FUSE_EXT_GROUPS"]

# Ops that may block for long on the host: they run in the pool, everything else inline.  READ joins
# them only when big: a thread hand-off costs more than a small page-cache copy (measured with
# bench/standalone.py), so small I/O stays inline, as in virtiofsd's default.
BLOCKING_OPS = frozenset(OP[n] for n in (
    "FSYNC", "FSYNCDIR", "SYNCFS", "FALLOCATE", "COPY_FILE_RANGE", "COPY_FILE_RANGE_64",
))  # SETLKW may wait forever: it gets threads of its own (lockwait.LockWaiters), never the pool's
FUSE_READ, FUSE_WRITE = OP["READ"], OP["WRITE"]
INLINE_IO_MAX = 128 * 1024
# A WRITE brings its data with it (nothing to wait for from a disk): served inline up to the largest a
# kernel sends, as the C virtiofsd serves every request on its queue thread.  A guest's dd bs=1M sends
# 496 KiB WRITEs (virtio-fs caps a request at the virtqueue's size, 128 entries, less 4 pages); through
# the pool each paid a copy of its data in the decoder and a thread hand-off: 84 against the C
# virtiofsd's 50 µs of CPU per WRITE in bench/vhost_roundtrip.py.
INLINE_WRITE_MAX = MAX_WRITE
NO_REPLY_OPS = frozenset((OP["FORGET"], OP["BATCH_FORGET"], OP["INTERRUPT"]))

_attr_cls: Any = F.CODECS["fuse_attr"].cls
_entry_codec: Any = F.CODECS["fuse_entry_out"]
_attr_out_codec: Any = F.CODECS["fuse_attr_out"]
_open_out_codec: Any = F.CODECS["fuse_open_out"]
_dirent_codec: Any = F.CODECS["fuse_dirent"]
_direntplus_codec: Any = F.CODECS["fuse_direntplus"]
_out_pack = F.OUT_HEADER.struct.pack
OUT_HEADER_SIZE = F.OUT_HEADER_SIZE
IN_HEADER_SIZE = F.IN_HEADER_SIZE
DIRENT_SIZE = _dirent_codec.size
DIRENTPLUS_SIZE = _direntplus_codec.size


class StatLike(Protocol):
    """os.stat_result or anything with the same fields (syscalls.Statx)."""

    @property
    def st_ino(self) -> int: ...

    @property
    def st_mode(self) -> int: ...

    @property
    def st_nlink(self) -> int: ...

    @property
    def st_uid(self) -> int: ...

    @property
    def st_gid(self) -> int: ...

    @property
    def st_rdev(self) -> int: ...

    @property
    def st_size(self) -> int: ...

    @property
    def st_blocks(self) -> int: ...

    @property
    def st_blksize(self) -> int: ...

    @property
    def st_atime_ns(self) -> int: ...

    @property
    def st_mtime_ns(self) -> int: ...

    @property
    def st_ctime_ns(self) -> int: ...


@dataclass(slots=True)
class Context:
    """Who asked: the caller's credentials from fuse_in_header."""

    uid: int
    gid: int
    pid: int
    unique: int = 0
    nodeid: int = 0
    groups: tuple[int, ...] = ()  # supplementary groups, from the FUSE_EXT_GROUPS extension


@dataclass(slots=True)
class Entry:
    """A LOOKUP-style answer: a new reference (nlookup + 1) to `nodeid`."""

    nodeid: int
    generation: int
    attr: StatLike
    attr_flags: int = 0  # FUSE_ATTR_SUBMOUNT, ...
    entry_timeout: float = 0.0
    attr_timeout: float = 0.0


@dataclass(slots=True)
class DirEntry:
    """One directory entry; `offset` is the cookie that resumes after it."""

    ino: int
    offset: int
    type: int  # DT_*
    name: bytes


@dataclass
class Negotiated:
    """What FUSE_INIT agreed on (exposed for tests, the UI and the transports)."""

    major: int = 0
    minor: int = 0
    kernel_flags: int = 0
    flags: int = 0
    max_write: int = MAX_WRITE
    max_readahead: int = 0
    done: bool = False

    def has(self, name: str) -> bool:
        return bool(self.flags & INIT_FLAG[name])


_U64 = (1 << 64) - 1


def _attr_values(st: StatLike, flags: int = 0) -> tuple[int, ...]:
    """fuse_attr's fields in wire order, straight from a stat (no record object on the hot path).

    Seconds before 1970 go out two's complement: the field is u64 on the wire and the kernel reads it as s64
    (as libfuse's implicit conversion sends them); nanoseconds stay 0..999999999 (divmod floors).
    """
    a_s, a_ns = divmod(st.st_atime_ns, 1_000_000_000)
    m_s, m_ns = divmod(st.st_mtime_ns, 1_000_000_000)
    c_s, c_ns = divmod(st.st_ctime_ns, 1_000_000_000)
    return (st.st_ino, st.st_size, st.st_blocks, a_s & _U64, m_s & _U64, c_s & _U64, a_ns, m_ns, c_ns, st.st_mode,
            st.st_nlink, st.st_uid, st.st_gid, st.st_rdev & 0xFFFFFFFF, st.st_blksize, flags)


def attr_from_stat(st: StatLike, flags: int = 0) -> Any:
    """fuse_attr from an os.stat_result (or anything with the same fields)."""
    return _attr_cls(*_attr_values(st, flags))


_TIMEOUTS: dict[float, tuple[int, int]] = {}


def _split_timeout(t: float) -> tuple[int, int]:
    """(seconds, nanoseconds); a filesystem uses a few timeouts, so each is split once."""
    r = _TIMEOUTS.get(t)
    if r is None:
        s = int(t)
        r = (s, int((t - s) * 1e9))
        if len(_TIMEOUTS) < 64:
            _TIMEOUTS[t] = r
    return r


def _entry_values(e: Entry) -> tuple[int, ...]:
    """fuse_entry_out's fields in wire order (fuse_attr flattened into it)."""
    es, ens = _split_timeout(e.entry_timeout)
    as_, ans = _split_timeout(e.attr_timeout)
    return (e.nodeid, e.generation, es, as_, ens, ans, *_attr_values(e.attr, e.attr_flags))


# The hot replies pack straight into the spec's flat struct format (fuse_attr is all scalars), skipping
# the generic record flattening.
_entry_pack = _entry_codec.struct.pack
_attr_out_pack = _attr_out_codec.struct.pack
_open_out_pack = _open_out_codec.struct.pack
_direntplus_pack = _direntplus_codec.struct.pack
_in_header_pack = F.IN_HEADER.struct.pack
_ENTRY_OUT_END = OUT_HEADER_SIZE + _entry_codec.size
_FUSE_LOOKUP = spec.OPCODE_BY_NAME["LOOKUP"].value


def encode_entry(e: Entry) -> bytes:
    return _entry_pack(*_entry_values(e))


def encode_attr_out(st: StatLike, timeout: float) -> bytes:
    s, ns = _split_timeout(timeout)
    return _attr_out_pack(s, ns, 0, *_attr_values(st))


def encode_open_out(fh: int, open_flags: int, backing_id: int = 0) -> bytes:
    return _open_out_pack(fh, open_flags, backing_id)


class FastPath(Protocol):
    """A native answerer for the commonest requests (daemon/passthrough/_fastmodule.c): the reply bytes (or a
    tuple of reply parts), b"" for a request served that takes no reply, or None when the Python path must
    serve it (nothing changed)."""

    def __call__(self, request: Buffer, chain: Any = None, /) -> bytes | tuple[Buffer, ...] | None:
        """`chain`: the vhost-user chain the request came in, for a READ straight into its buffers."""
        ...

    def counts(self) -> tuple[dict[int, int], dict[tuple[int, int], int], int]:
        """({opcode: served}, {(opcode, errno): errors answered}, requests handed back to Python)."""
        ...


def _enosys(*_a: Any, **_k: Any) -> Any:
    raise OSError(errno.ENOSYS, "not implemented")


class FileSystem:
    """The operations a FUSE server answers.  Every op raises ENOSYS unless a subclass overrides it.

    Methods raise OSError to answer an error.  `nodeid`/`parent` are fuse nodeids; names are bytes.
    """

    # fuse_init_out.max_stack_depth when FUSE_PASSTHROUGH is negotiated (1..FILESYSTEM_MAX_STACK_DEPTH)
    max_stack_depth = 1

    def backing_id(self, fh: int) -> int:
        """The backing_id of an open/create answered with FOPEN_PASSTHROUGH (FUSE_DEV_IOC_BACKING_OPEN)."""
        return 0

    def init(self, kernel_flags: int) -> int:
        """Called at FUSE_INIT with what the kernel offers; return the flags this filesystem wants."""
        return 0

    def destroy(self) -> None:
        """FUSE_DESTROY or transport shutdown: release everything."""

    def fast_path(self) -> FastPath | None:
        """A native fast path over this filesystem's own state, answering byte for byte as its methods would;
        None (the default) serves everything through the methods."""
        return None

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        return _enosys()

    def forget(self, ctx: Context, nodeid: int, nlookup: int) -> None:
        """No reply either way."""

    def batch_forget(self, ctx: Context, forgets: list[tuple[int, int]]) -> None:
        for nodeid, n in forgets:
            self.forget(ctx, nodeid, n)

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[StatLike, float]:
        return _enosys()

    def setattr(self, ctx: Context, nodeid: int, sa: Any) -> tuple[StatLike, float]:
        """`sa` is the decoded fuse_setattr_in (valid mask + fields)."""
        return _enosys()

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        return _enosys()

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        return _enosys()

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int) -> Entry:
        return _enosys()

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        return _enosys()

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        _enosys()

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        _enosys()

    def rename(self, ctx: Context, olddir: int, oldname: bytes, newdir: int, newname: bytes, flags: int) -> None:
        _enosys()

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        return _enosys()

    def open(self, ctx: Context, nodeid: int, flags: int, open_flags: int) -> tuple[int, int]:
        """Returns (fh, FOPEN_* flags)."""
        return _enosys()

    def create(self, ctx: Context, parent: int, name: bytes, mode: int, flags: int,
               umask: int, open_flags: int = 0) -> tuple[Entry, int, int]:
        return _enosys()

    def tmpfile(self, ctx: Context, parent: int, mode: int, flags: int, umask: int) -> tuple[Entry, int, int]:
        return _enosys()

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int, size: int) -> Buffer:
        return _enosys()

    def write(self, ctx: Context, nodeid: int, fh: int, offset: int, data: Buffer, write_flags: int) -> int:
        return _enosys()

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        _enosys()

    def release(self, ctx: Context, nodeid: int, fh: int, flags: int, release_flags: int,
                lock_owner: int) -> None:
        _enosys()

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        _enosys()

    def opendir(self, ctx: Context, nodeid: int, flags: int) -> tuple[int, int]:
        return _enosys()

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int) -> Iterator[DirEntry]:
        """Entries after cookie `offset`; the engine stops iterating when the reply is full."""
        return _enosys()

    def releasedir(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        _enosys()

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        _enosys()

    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        return _enosys()

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        _enosys()

    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int) -> None:
        _enosys()

    def getxattr(self, ctx: Context, nodeid: int, name: bytes, size: int) -> bytes | int:
        """size 0 asks for the length (return an int); a value longer than `size` raises ERANGE."""
        return _enosys()

    def listxattr(self, ctx: Context, nodeid: int, size: int) -> bytes | int:
        return _enosys()

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        _enosys()

    def fallocate(self, ctx: Context, nodeid: int, fh: int, offset: int, length: int, mode: int) -> None:
        _enosys()

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        return _enosys()

    def copy_file_range(self, ctx: Context, nodeid_in: int, fh_in: int, off_in: int, nodeid_out: int,
                        fh_out: int, off_out: int, length: int, flags: int) -> int:
        return _enosys()

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        _enosys()

    def getlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lk: Any, lk_flags: int) -> Any:
        return _enosys()

    def setlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lk: Any, lk_flags: int, sleep: bool) -> None:
        _enosys()

    def counters(self) -> dict[str, Any]:
        """Filesystem-specific counters merged into Server.counters()."""
        return {}


class RateLimitedLog:
    """Warnings a client can trigger at will: a traceback only the first time per key (a bug to report),
    then at most one line per `interval` seconds with the number left out, so the log can't be flooded."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self.log = logger
        self.interval = interval
        self._seen: set[str] = set()
        self._last = -interval
        self._quiet = 0
        self._lock = threading.Lock()

    def _may_log(self) -> int | None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval:
                self._quiet += 1
                return None
            self._last, quiet, self._quiet = now, self._quiet, 0
            return quiet

    def line(self, msg: str, *args: Any) -> None:
        quiet = self._may_log()
        if quiet:
            self.log.warning(msg + " (%d similar lines left out before this one)", *args, quiet)
        elif quiet is not None:
            self.log.warning(msg, *args)

    def bug(self, key: str, msg: str, *args: Any) -> None:
        """Inside an `except`: the traceback once per key, one line after that."""
        with self._lock:
            first = key not in self._seen and len(self._seen) < 1024
            if first:
                self._seen.add(key)
        if first:
            self.log.exception(msg, *args)
        else:
            self.line(msg + " (%s again)", *args, key)


@dataclass
class Counters:
    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    dropped: int = 0


class Server:
    """One FUSE session over any transport."""

    def __init__(self, fs: FileSystem, *, tap: Tap | None = None, pool_size: int = 8,
                 dispatch: str = "inline+pool", hold: EngineHoldPoint | None = None,
                 lock_waiters: int = 64) -> None:
        if dispatch not in ("inline+pool", "pool", "inline"):
            raise ValueError(f"unknown dispatch model {dispatch!r}")
        self.fs = fs
        self.tap = tap
        self.hold = hold  # the debugger's hold point (daemon/hold.py); None costs nothing
        if hold is not None:
            hold.bind(self)
        self.dispatch = dispatch
        self.negotiated = Negotiated()
        # What the transport adds to FUSE_INIT when the kernel offers it (FUSE_OVER_IO_URING: transport/uring.py).
        self.transport_flags = 0
        self.ctx: F.FuseContext = F.DEFAULT_CONTEXT
        self._pool = ThreadPoolExecutor(max_workers=max(1, pool_size), thread_name_prefix="fuse-pool") \
            if dispatch != "inline" else None
        self._stats = Counters()
        self._lock = threading.Lock()
        self._complain = RateLimitedLog(log)
        self._waiters = LockWaiters(lock_waiters)
        self.destroyed = False
        # What READDIRPLUS's own LOOKUPs through the fast path added to its counters (served, errors by
        # errno, fallbacks): counters() takes them out, as they are no requests of the client's.
        self._inner_lookups: Counter[Any] = Counter()
        # The filesystem's fast path, used once INIT is done; never with a tap or a hold point (they see
        # every request and reply as Python objects).
        self._fast = fs.fast_path() if tap is None and hold is None else None
        self.fast: FastPath | None = None
        self._handlers: dict[int, Callable[[Context, F.Request], list[Buffer] | None]] = {}
        for o in spec.OPCODES:
            h = getattr(self, f"_do_{o.name.lower()}", None)
            if h is not None:
                self._handlers[o.value] = h

    # ------------------------------------------------------------------ entry point
    def handle(self, buf: Buffer, reply: ReplySink, queue: int = 1) -> None:
        """Serve one request; `reply` gets the reply (now, or later from a pool thread).

        `reply` is called exactly once, except for opcodes in NO_REPLY_OPS and for messages shorter than a
        fuse_in_header: those never get a reply, so a virtqueue transport completes their chains itself.
        """
        if self.fast is not None:
            r = self.fast_answer(buf)
            if r is not None:
                if r:
                    self.send_fast(reply, r)
                return
        self.handle_slow(buf, reply, queue)

    def fast_answer(self, buf: Buffer) -> bytes | tuple[Buffer, ...] | None:
        """The fast path's reply to `buf` (b"": served, no reply to send), or None: handle_slow() serves it.

        For a transport that sends the reply itself (a virtqueue: the chain is the sink, so no bound method
        or header peek per request); handle() is this plus handle_slow()."""
        fast = self.fast
        if fast is None:
            return None
        try:
            return fast(buf)
        except Exception:
            return self.fast_failed(buf)

    def fast_failed(self, buf: Buffer) -> bytes | None:
        """In the `except` of a fast-path call that raised (counted by the fast path): fast_answer()'s
        result for it, b"" for a request without a reply, else None (the Python path answers it)."""
        self._complain.bug("fast", "the fast path failed on a request")
        if len(buf) < IN_HEADER_SIZE or F.peek_header(buf)[1] in NO_REPLY_OPS:
            return b""
        return None

    def send_fast(self, reply: ReplySink, r: bytes | tuple[Buffer, ...]) -> None:
        try:
            reply(r if isinstance(r, tuple) else (r,))  # parts: a READ's header and its data in place
        except Exception as e:
            self.reply_failed(e)

    def reply_failed(self, e: Exception) -> None:
        """In the `except` of a fast-path reply that could not be sent (the transport is going)."""
        self._complain.bug(f"reply:{type(e).__name__}", "sending a fast-path reply failed")

    def handle_slow(self, buf: Buffer, reply: ReplySink, queue: int = 1) -> None:
        """handle() after the fast path declined: the tap, the hold point, then serve_request()."""
        hold = self.hold
        if self.tap is not None or hold is not None:
            try:
                _len, opc, uniq = F.peek_header(buf)
            except DecodeError:
                opc, uniq = -1, 0
            held = hold is not None and hold.match_request(queue, opc)
            ts = time.time_ns()
            if self.tap is not None:
                self.tap("request:held" if held else "request", queue, uniq, ts, bytes(buf))
            if held:
                assert hold is not None
                hold.hold_request(bytes(buf), reply, queue, ts)  # the transport may reuse buf
                return
        self.serve_request(buf, reply, queue)

    def serve_later(self, buf: Buffer, reply: ReplySink, queue: int = 1) -> None:
        """serve_request() on a pool thread (a released request must not run on a debugger client's thread)."""
        if self._pool is not None:
            try:
                self._pool.submit(self.serve_request, buf, reply, queue)
                return
            except RuntimeError:  # shutting down: serve it here
                pass
        self.serve_request(buf, reply, queue)

    def serve_request(self, buf: Buffer, reply: ReplySink, queue: int = 1) -> None:
        """Serve one request already tapped (handle() without the tap and the hold point)."""
        try:
            req = F.decode_request(buf, self.ctx)
        except DecodeError as e:
            self._bad_request(buf, e, reply, queue)
            return
        opcode = req.op.value
        if opcode == OP["SETLKW"]:
            self._waiters.submit(req.header.unique, req.header.uid, lambda: self._serve(req, reply, queue),
                                 lambda err: self._refuse(req, reply, queue, err))
            return
        if self._pool is not None and (self.dispatch == "pool" or opcode in BLOCKING_OPS or (
                opcode == FUSE_READ and req.args["read"].size > INLINE_IO_MAX) or (
                opcode == FUSE_WRITE and req.args["write"].size > INLINE_WRITE_MAX)):
            try:
                self._pool.submit(self._serve, req, reply, queue)
                return
            except RuntimeError:  # the pool is shut down (session ending): answer inline
                pass
        self._serve(req, reply, queue)

    def _bad_request(self, buf: Buffer, e: DecodeError, reply: ReplySink, queue: int) -> None:
        with self._lock:
            self._stats.dropped += 1
        try:
            _length, opcode, unique = F.peek_header(buf)
        except DecodeError:
            log.warning("dropped a request: %s", e)
            return
        if opcode in NO_REPLY_OPS:
            log.warning("dropped a malformed no-reply request (opcode %d, unique %d): %s", opcode, unique, e)
            return
        err = errno.ENOSYS if opcode not in spec.OPCODE_BY_VALUE else errno.EINVAL
        log.warning("bad request (opcode %d, unique %d): %s -> %s", opcode, unique, e, errno.errorcode[err])
        self._send(reply, queue, unique, [_out_pack(OUT_HEADER_SIZE, -err, unique)])

    def _refuse(self, req: F.Request, reply: ReplySink, queue: int, err: int) -> None:
        """Answer `err` without calling the filesystem (a SETLKW past the waiter limit, or interrupted)."""
        unique = req.header.unique
        if err == errno.ENOLCK:
            self._complain.line("SETLKW (unique %d, uid %d, pid %d): no lock waiter free (%d in all, %d per "
                                "uid) -> ENOLCK", unique, req.header.uid, req.header.pid, self._waiters.limit,
                                self._waiters.per_uid)
        with self._lock:
            self._stats.ops[req.op.name] += 1
            self._stats.errors[f"{req.op.name}:{errno.errorcode[err]}"] += 1
        self._send(reply, queue, unique, [_out_pack(OUT_HEADER_SIZE, -err, unique)])

    def _serve(self, req: F.Request, reply: ReplySink, queue: int) -> None:
        h = req.header
        unique = h.unique
        opcode = req.op.value
        name = req.op.name
        ctx = Context(h.uid, h.gid, h.pid, unique, h.nodeid)
        for eh, value in req.ext:
            if eh.type == EXT_GROUPS:
                ctx.groups = tuple(value)
        handler = self._handlers.get(opcode)
        err = 0
        body: list[Buffer] | None = None
        try:
            if handler is None:
                raise OSError(errno.ENOSYS, f"{name} is not implemented")
            if not self.negotiated.done and opcode != OP["INIT"]:
                raise OSError(errno.EIO, f"{name} before FUSE_INIT")
            body = handler(ctx, req)
        except OSError as e:
            err = e.errno or errno.EIO
            if err < 1 or err > 4095:
                err = errno.EIO
        except OverflowError as e:
            # An integer the host syscall can't take (a READ at offset 2**63): the host kernel's answer
            # to a negative loff_t, and one line, so a client can't flood the log with tracebacks.
            err = errno.EINVAL
            self._complain.line("%s (unique %d): %s -> EINVAL", name, unique, e)
        except Exception as e:  # a bug in an op must not kill the session
            self._complain.bug(f"{name}:{type(e).__name__}", "%s (unique %d) failed", name, unique)
            err = errno.EIO
        with self._lock:
            self._stats.ops[name] += 1
            if err:
                self._stats.errors[f"{name}:{errno.errorcode.get(err, err)}"] += 1
        if opcode in NO_REPLY_OPS:
            return
        parts: list[Buffer]
        if err:
            parts = [_out_pack(OUT_HEADER_SIZE, -err, unique)]
        elif body:
            size = OUT_HEADER_SIZE
            for p in body:
                size += len(p)
            parts = [_out_pack(size, 0, unique), *body]
        else:
            parts = [_out_pack(OUT_HEADER_SIZE, 0, unique)]
        hold = self.hold
        if hold is not None and hold.match_reply(queue, opcode):
            raw = b"".join(parts)
            ts = time.time_ns()
            if self.tap is not None:
                self.tap("reply:held", queue, unique, ts, raw)
            hold.hold_reply(queue, unique, opcode, raw, reply, F.encode_request_obj(req, self.ctx), ts)
            return
        self._send(reply, queue, unique, parts)

    def send_reply(self, reply: ReplySink, queue: int, unique: int, data: bytes, direction: str) -> None:
        """A reply decided by the hold point (released, answered, rewritten): tapped as `direction`."""
        if self.tap is not None:
            self.tap(direction, queue, unique, time.time_ns(), data)
        try:
            reply([data])
        except Exception:
            log.exception("sending the reply to unique %d failed", unique)

    def _send(self, reply: ReplySink, queue: int, unique: int, parts: list[Buffer]) -> None:
        if self.tap is not None:
            self.tap("reply", queue, unique, time.time_ns(), b"".join(parts))
        try:
            reply(parts)
        except Exception as e:  # the transport is gone (a session ending): a traceback once, then lines
            self._complain.bug(f"reply:{type(e).__name__}", "sending the reply to unique %d failed", unique)

    # ------------------------------------------------------------------ state
    def counters(self) -> dict[str, Any]:
        """Per-opcode counts, errors, dropped requests and the filesystem's own counters (syncfs per st_dev)."""
        with self._lock:
            ops, errors = Counter(self._stats.ops), Counter(self._stats.errors)
            out: dict[str, Any] = {"ops": ops, "errors": errors, "dropped": self._stats.dropped}
        if self._fast is not None:
            served, failed, fallbacks = self._fast.counts()
            with self._lock:
                inner = Counter(self._inner_lookups)
            served = dict(served)
            failed = dict(failed)
            if inner:
                served[_FUSE_LOOKUP] = served.get(_FUSE_LOOKUP, 0) - inner.pop("served", 0)
                fallbacks -= inner.pop("fallbacks", 0)
                for err, n in inner.items():
                    failed[(_FUSE_LOOKUP, err)] = failed.get((_FUSE_LOOKUP, err), 0) - n
            for opcode, n in served.items():
                if n:
                    ops[spec.OPCODE_BY_VALUE[opcode].name] += n
            for (opcode, err), n in failed.items():
                if n:
                    errors[f"{spec.OPCODE_BY_VALUE[opcode].name}:{errno.errorcode.get(err, err)}"] += n
            out["fast_path"] = {"served": sum(served.values()), "fallbacks": fallbacks}
        out["ops"], out["errors"] = dict(ops), dict(errors)
        w = self._waiters
        out["lock_waits"] = {"waiting": w.busy(), "refused": w.refused, "interrupted": w.interrupted}
        out.update(self.fs.counters())
        return out

    @property
    def lock_waiter_limit(self) -> int:
        """Blocking lock waits that may run at once (past it, SETLKW is ENOLCK): what a transport that
        lends each request a slot (an io_uring entry) must keep spare."""
        return self._waiters.limit

    def end_lock_waits(self) -> None:
        """Answer every blocked lock wait ENOLCK now: the session is ending, and a wait can last forever
        (the transport waits for in-flight requests before it lets go of guest memory)."""
        self._waiters.shutdown()

    def start_pool(self) -> None:
        """Start the pool's first thread now, from the calling thread, and wait until it runs.  The first
        blocking request (a guest's FSYNC at the end of a dd) would otherwise start it on its own critical
        path: 0.2-3 ms against the 20-90 µs of a hand-off to a running thread.  A transport calls it from
        the thread that entered the sandbox, which every serving thread is started from: a thread started
        in that thread shares its root and takes its seccomp filter and capabilities."""
        if self._pool is not None:
            self._pool.submit(int).result()

    def shutdown(self) -> None:
        """End the lock waits, stop the pool and release the filesystem (idempotent); nothing stays held."""
        if self.hold is not None:
            self.hold.flush()
        self._waiters.shutdown()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if not self.destroyed:
            self.destroyed = True
            self.fs.destroy()

    # ------------------------------------------------------------------ op handlers
    def _do_init(self, ctx: Context, req: F.Request) -> list[Buffer]:
        i = req.args["init"]
        n = self.negotiated
        if i.major < 7:
            raise OSError(errno.EPROTO, f"FUSE major {i.major} is not supported")
        if i.major > 7:
            # Tell the kernel our major; it sends INIT again with 7.x.
            out = F.make("fuse_init_out", major=7, minor=spec.KERNEL_MINOR_VERSION)
            return [F.CODECS["fuse_init_out"].encode(out)]
        if i.minor < MIN_KERNEL_MINOR:
            log.error("kernel FUSE 7.%d is older than 7.%d, the oldest this daemon supports",
                      i.minor, MIN_KERNEL_MINOR)
            raise OSError(errno.EPROTO, "protocol too old")
        kernel_flags = i.flags | ((i.flags2 << 32) if i.flags & INIT_FLAG["INIT_EXT"] else 0)
        want = self.fs.init(kernel_flags & ENGINE_FLAGS) & ENGINE_FLAGS & kernel_flags
        want |= kernel_flags & (INIT_FLAG["MAX_PAGES"] | INIT_FLAG["BIG_WRITES"] | self.transport_flags)
        if want >> 32:
            want |= INIT_FLAG["INIT_EXT"]  # the kernel reads flags2 only with INIT_EXT
        n.major, n.minor = 7, min(i.minor, spec.KERNEL_MINOR_VERSION)
        n.kernel_flags, n.flags = kernel_flags, want
        n.max_readahead = i.max_readahead
        n.max_write = MAX_WRITE
        out = F.make("fuse_init_out", major=7, minor=spec.KERNEL_MINOR_VERSION, max_readahead=i.max_readahead,
                     flags=want & 0xFFFFFFFF, max_background=64, congestion_threshold=48, max_write=MAX_WRITE,
                     time_gran=1, max_pages=MAX_PAGES, flags2=want >> 32,
                     max_stack_depth=self.fs.max_stack_depth if want & INIT_FLAG["PASSTHROUGH"] else 0)
        n.done = True
        self.ctx = F.FuseContext(n.minor, want)
        self.fast = self._fast
        log.info("FUSE_INIT: kernel 7.%d, flags %s", i.minor, spec.INIT_FLAGS.render(want))
        return [F.CODECS["fuse_init_out"].encode(out)]

    def _do_destroy(self, ctx: Context, req: F.Request) -> list[Buffer]:
        self.fast = None
        self.fs.destroy()
        self.negotiated.done = False
        return []

    def _do_lookup(self, ctx: Context, req: F.Request) -> list[Buffer]:
        return [encode_entry(self.fs.lookup(ctx, ctx.nodeid, req.args["name"]))]

    def _do_forget(self, ctx: Context, req: F.Request) -> None:
        self.fs.forget(ctx, ctx.nodeid, req.args["forget"].nlookup)

    def _do_batch_forget(self, ctx: Context, req: F.Request) -> None:
        self.fs.batch_forget(ctx, [(f.nodeid, f.nlookup) for f in req.args["forgets"]])

    def _do_interrupt(self, ctx: Context, req: F.Request) -> None:
        """Ends a blocked lock wait (answered EINTR); other ops are short and get their own reply."""
        self._waiters.interrupt(req.args["interrupt"].unique)

    def _do_getattr(self, ctx: Context, req: F.Request) -> list[Buffer]:
        g = req.args.get("getattr")
        fh = g.fh if g is not None and g.getattr_flags & GETATTR_FH else None
        st, timeout = self.fs.getattr(ctx, ctx.nodeid, fh)
        return [encode_attr_out(st, timeout)]

    def _do_setattr(self, ctx: Context, req: F.Request) -> list[Buffer]:
        st, timeout = self.fs.setattr(ctx, ctx.nodeid, req.args["setattr"])
        return [encode_attr_out(st, timeout)]

    def _do_readlink(self, ctx: Context, req: F.Request) -> list[Buffer]:
        return [self.fs.readlink(ctx, ctx.nodeid)]

    def _do_symlink(self, ctx: Context, req: F.Request) -> list[Buffer]:
        return [encode_entry(self.fs.symlink(ctx, ctx.nodeid, req.args["name"], req.args["target"]))]

    def _do_mknod(self, ctx: Context, req: F.Request) -> list[Buffer]:
        m = req.args["mknod"]
        return [encode_entry(self.fs.mknod(ctx, ctx.nodeid, req.args["name"], m.mode, m.rdev, m.umask))]

    def _do_mkdir(self, ctx: Context, req: F.Request) -> list[Buffer]:
        m = req.args["mkdir"]
        return [encode_entry(self.fs.mkdir(ctx, ctx.nodeid, req.args["name"], m.mode, m.umask))]

    def _do_unlink(self, ctx: Context, req: F.Request) -> list[Buffer]:
        self.fs.unlink(ctx, ctx.nodeid, req.args["name"])
        return []

    def _do_rmdir(self, ctx: Context, req: F.Request) -> list[Buffer]:
        self.fs.rmdir(ctx, ctx.nodeid, req.args["name"])
        return []

    def _do_rename(self, ctx: Context, req: F.Request) -> list[Buffer]:
        self.fs.rename(ctx, ctx.nodeid, req.args["name"], req.args["rename"].newdir, req.args["newname"], 0)
        return []

    def _do_rename2(self, ctx: Context, req: F.Request) -> list[Buffer]:
        r = req.args["rename"]
        self.fs.rename(ctx, ctx.nodeid, req.args["name"], r.newdir, req.args["newname"], r.flags)
        return []

    def _do_link(self, ctx: Context, req: F.Request) -> list[Buffer]:
        return [encode_entry(self.fs.link(ctx, req.args["link"].oldnodeid, ctx.nodeid, req.args["newname"]))]

    def _do_open(self, ctx: Context, req: F.Request) -> list[Buffer]:
        o = req.args["open"]
        fh, flags = self.fs.open(ctx, ctx.nodeid, o.flags, o.open_flags)
        return [self._open_out(fh, flags)]

    def _open_out(self, fh: int, flags: int) -> bytes:
        return encode_open_out(fh, flags, self.fs.backing_id(fh) if flags & FOPEN_PASSTHROUGH else 0)

    def _do_create(self, ctx: Context, req: F.Request) -> list[Buffer]:
        c = req.args["create"]
        entry, fh, flags = self.fs.create(ctx, ctx.nodeid, req.args["name"], c.mode, c.flags, c.umask,
                                          c.open_flags)
        return [encode_entry(entry), self._open_out(fh, flags)]

    def _do_tmpfile(self, ctx: Context, req: F.Request) -> list[Buffer]:
        c = req.args["create"]
        entry, fh, flags = self.fs.tmpfile(ctx, ctx.nodeid, c.mode, c.flags, c.umask)
        return [encode_entry(entry), self._open_out(fh, flags)]

    def _do_read(self, ctx: Context, req: F.Request) -> list[Buffer]:
        r = req.args["read"]
        return [self.fs.read(ctx, ctx.nodeid, r.fh, r.offset, min(r.size, MAX_WRITE))]

    def _do_write(self, ctx: Context, req: F.Request) -> list[Buffer]:
        w = req.args["write"]
        data = req.args["data"]
        if len(data) != w.size:
            raise OSError(errno.EINVAL, f"WRITE size {w.size} but {len(data)} data bytes")
        n = self.fs.write(ctx, ctx.nodeid, w.fh, w.offset, data, w.write_flags)
        return [F.CODECS["fuse_write_out"].struct.pack(n, 0)]

    def _do_flush(self, ctx: Context, req: F.Request) -> list[Buffer]:
        f = req.args["flush"]
        self.fs.flush(ctx, ctx.nodeid, f.fh, f.lock_owner)
        return []

    def _do_release(self, ctx: Context, req: F.Request) -> list[Buffer]:
        r = req.args["release"]
        self.fs.release(ctx, ctx.nodeid, r.fh, r.flags, r.release_flags, r.lock_owner)
        return []

    def _do_fsync(self, ctx: Context, req: F.Request) -> list[Buffer]:
        f = req.args["fsync"]
        self.fs.fsync(ctx, ctx.nodeid, f.fh, bool(f.fsync_flags & FSYNC_FDATASYNC))
        return []

    def _do_opendir(self, ctx: Context, req: F.Request) -> list[Buffer]:
        o = req.args["open"]
        fh, flags = self.fs.opendir(ctx, ctx.nodeid, o.flags)
        return [encode_open_out(fh, flags)]

    def _do_readdir(self, ctx: Context, req: F.Request) -> list[Buffer]:
        return [self._readdir(ctx, req, plus=False)]

    def _do_readdirplus(self, ctx: Context, req: F.Request) -> list[Buffer]:
        return [self._readdir(ctx, req, plus=True)]

    def _readdir(self, ctx: Context, req: F.Request, *, plus: bool) -> bytes:
        r = req.args["read"]
        size = min(r.size, MAX_WRITE)
        out = bytearray()
        head = DIRENTPLUS_SIZE if plus else DIRENT_SIZE
        fast = self.fast if plus else None
        inner: Counter[Any] = Counter()
        try:
            return self._readdir_into(ctx, r, size, head, plus, fast, inner, out)
        finally:
            if inner:
                with self._lock:
                    self._inner_lookups.update(inner)

    def _readdir_into(self, ctx: Context, r: Any, size: int, head: int, plus: bool, fast: FastPath | None,
                      inner: Counter[Any], out: bytearray) -> bytes:
        """READDIR(PLUS)'s entries into `out`.  A READDIRPLUS entry's LOOKUP goes through the fast path
        where there is one (its fuse_entry_out is the bytes a LOOKUP's reply carries, which the fast path
        answers as the Python path does), else through fs.lookup; `inner` counts what the fast path was
        asked, as it counts them as requests."""
        for d in self.fs.readdir(ctx, ctx.nodeid, r.fh, r.offset):
            reclen = spec.dirent_align(head + len(d.name))
            if len(out) + reclen > size:
                break
            pad = b"\0" * (reclen - head - len(d.name))
            dirent = (d.ino, d.offset, len(d.name), d.type)
            if not plus:
                out += _dirent_codec.struct.pack(*dirent) + d.name + pad
                continue
            if d.name in (b".", b".."):
                vals: tuple[int, ...] = _ZERO_ENTRY
            else:
                try:
                    fast_r = self._fast_entry(fast, ctx, d.name, inner) if fast is not None else None
                    if fast_r is not None:
                        entry, err = fast_r
                        if err:
                            raise OSError(err, os.strerror(err))  # the same answer as fs.lookup's below
                        out += entry[OUT_HEADER_SIZE:_ENTRY_OUT_END] + \
                            _dirent_codec.struct.pack(*dirent) + d.name + pad
                        continue
                    e = self.fs.lookup(ctx, ctx.nodeid, d.name)
                except OSError as ex:
                    if ex.errno in (errno.ENOENT, errno.ESTALE):
                        continue  # vanished since the listing
                    if not out:
                        raise
                    break  # answer what we have; the kernel asks again from this offset
                vals = _entry_values(e)
            out += _direntplus_pack(*vals, *dirent) + d.name + pad
        return bytes(out)

    @staticmethod
    def _fast_entry(fast: FastPath, ctx: Context, name: bytes, inner: Counter[Any]) -> tuple[bytes, int] | None:
        """The fast path's reply to a LOOKUP of `name` under the directory being read (its header and the
        fuse_entry_out) with its errno (0 for an entry), or None where it leaves the name to Python."""
        n = IN_HEADER_SIZE + len(name) + 1
        try:
            r = fast(_in_header_pack(n, _FUSE_LOOKUP, ctx.unique, ctx.nodeid, ctx.uid, ctx.gid, ctx.pid, 0, 0)
                     + name + b"\0")
        except Exception:
            return None  # fs.lookup answers it, or raises what it raises
        if not isinstance(r, bytes) or len(r) < OUT_HEADER_SIZE:
            inner["fallbacks"] += r is None
            return None
        inner["served"] += 1
        err = -int.from_bytes(r[4:8], "little", signed=True)
        if err:
            inner[err] += 1
        return r, err

    def _do_releasedir(self, ctx: Context, req: F.Request) -> list[Buffer]:
        r = req.args["release"]
        self.fs.releasedir(ctx, ctx.nodeid, r.fh, r.flags)
        return []

    def _do_fsyncdir(self, ctx: Context, req: F.Request) -> list[Buffer]:
        f = req.args["fsync"]
        self.fs.fsyncdir(ctx, ctx.nodeid, f.fh, bool(f.fsync_flags & FSYNC_FDATASYNC))
        return []

    def _do_statfs(self, ctx: Context, req: F.Request) -> list[Buffer]:
        s = self.fs.statfs(ctx, ctx.nodeid)
        st = F.make("fuse_kstatfs", blocks=s.f_blocks, bfree=s.f_bfree, bavail=s.f_bavail, files=s.f_files,
                    ffree=s.f_ffree, bsize=s.f_bsize, namelen=s.f_namemax, frsize=s.f_frsize)
        return [F.CODECS["fuse_statfs_out"].encode(F.CODECS["fuse_statfs_out"].cls(st))]

    def _do_access(self, ctx: Context, req: F.Request) -> list[Buffer]:
        self.fs.access(ctx, ctx.nodeid, req.args["access"].mask)
        return []

    def _do_setxattr(self, ctx: Context, req: F.Request) -> list[Buffer]:
        s = req.args["setxattr"]
        value = req.args["value"]
        if len(value) != s.size:
            raise OSError(errno.EINVAL, f"SETXATTR size {s.size} but {len(value)} value bytes")
        self.fs.setxattr(ctx, ctx.nodeid, req.args["name"], value, s.flags)
        return []

    def _xattr_reply(self, res: bytes | int) -> list[Buffer]:
        if isinstance(res, int):
            return [F.CODECS["fuse_getxattr_out"].struct.pack(res, 0)]
        return [res]

    def _do_getxattr(self, ctx: Context, req: F.Request) -> list[Buffer]:
        size = req.args["getxattr"].size
        return self._xattr_reply(self.fs.getxattr(ctx, ctx.nodeid, req.args["name"], size))

    def _do_listxattr(self, ctx: Context, req: F.Request) -> list[Buffer]:
        return self._xattr_reply(self.fs.listxattr(ctx, ctx.nodeid, req.args["getxattr"].size))

    def _do_removexattr(self, ctx: Context, req: F.Request) -> list[Buffer]:
        self.fs.removexattr(ctx, ctx.nodeid, req.args["name"])
        return []

    def _do_fallocate(self, ctx: Context, req: F.Request) -> list[Buffer]:
        f = req.args["fallocate"]
        self.fs.fallocate(ctx, ctx.nodeid, f.fh, f.offset, f.length, f.mode)
        return []

    def _do_lseek(self, ctx: Context, req: F.Request) -> list[Buffer]:
        s = req.args["lseek"]
        off = self.fs.lseek(ctx, ctx.nodeid, s.fh, s.offset, s.whence)
        return [F.CODECS["fuse_lseek_out"].struct.pack(off)]

    def _copy(self, ctx: Context, req: F.Request) -> int:
        c = req.args["copy"]
        return self.fs.copy_file_range(ctx, ctx.nodeid, c.fh_in, c.off_in, c.nodeid_out, c.fh_out, c.off_out,
                                       c.len, c.flags)

    def _do_copy_file_range(self, ctx: Context, req: F.Request) -> list[Buffer]:
        n = self._copy(ctx, req)
        return [F.CODECS["fuse_write_out"].struct.pack(min(n, 0xFFFFFFFF), 0)]

    def _do_copy_file_range_64(self, ctx: Context, req: F.Request) -> list[Buffer]:
        return [F.CODECS["fuse_copy_file_range_out"].struct.pack(self._copy(ctx, req))]

    def _do_syncfs(self, ctx: Context, req: F.Request) -> list[Buffer]:
        self.fs.syncfs(ctx, ctx.nodeid)
        return []

    def _do_getlk(self, ctx: Context, req: F.Request) -> list[Buffer]:
        lk = req.args["lk"]
        res = self.fs.getlk(ctx, ctx.nodeid, lk.fh, lk.owner, lk.lk, lk.lk_flags)
        return [F.CODECS["fuse_lk_out"].encode(F.CODECS["fuse_lk_out"].cls(res))]

    def _do_setlk(self, ctx: Context, req: F.Request) -> list[Buffer]:
        lk = req.args["lk"]
        self.fs.setlk(ctx, ctx.nodeid, lk.fh, lk.owner, lk.lk, lk.lk_flags, False)
        return []

    def _do_setlkw(self, ctx: Context, req: F.Request) -> list[Buffer]:
        lk = req.args["lk"]
        self.fs.setlk(ctx, ctx.nodeid, lk.fh, lk.owner, lk.lk, lk.lk_flags, True)
        return []


class _ZeroStat:
    """Attributes of the '.'/'..' READDIRPLUS records (nodeid 0: the kernel ignores them)."""

    st_ino = st_mode = st_nlink = st_uid = st_gid = st_rdev = st_size = st_blocks = st_blksize = 0
    st_atime_ns = st_mtime_ns = st_ctime_ns = 0


_ZERO_STAT: StatLike = _ZeroStat()
_ZERO_ENTRY = (0, 0, 0, 0, 0, 0, *_attr_values(_ZERO_STAT))
