"""The pure-Python twin of _uringmodule.c: one FUSE-over-io_uring queue over ctypes and mmap.

The reference for the C ring (same class names, methods and behaviour; the tests run both).  The
kernel's rings are mmap'd and read and written with struct; the system calls go through libc's
syscall() by ctypes, which releases the GIL while the kernel works.  The ring indexes are published
with plain stores, which x86-64's memory order makes release/acquire (a Python call is a compiler
barrier); elsewhere use the C module.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
import time
from collections.abc import Sequence

from dissectors.fuse import CODECS

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
NR_IO_URING_SETUP, NR_IO_URING_ENTER, NR_IO_URING_REGISTER = 425, 426, 427
SETUP_CQSIZE, SETUP_R_DISABLED, SETUP_SQE128 = 1 << 3, 1 << 6, 1 << 10
FEAT_SINGLE_MMAP = 1
OFF_SQ_RING, OFF_CQ_RING, OFF_SQES = 0, 0x8000000, 0x10000000
REGISTER_FILES, REGISTER_RESTRICTIONS, REGISTER_ENABLE_RINGS = 2, 11, 12
RESTRICTION_SQE_OP, RESTRICTION_SQE_FLAGS_ALLOWED = 1, 2
OP_READ, OP_URING_CMD = 22, 46
IOSQE_FIXED_FILE = 1
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # spare entries' payloads: reserved, not committed
ENTER_GETEVENTS = 1
SQE_SIZE = 128
CMD_REGISTER, CMD_COMMIT_AND_FETCH = 1, 2  # spec.URING_CMD
WAKE_TAG = (1 << 64) - 1  # the read on the eventfd: a commit from another thread, or close()
# struct fuse_uring_req_header, from the spec table: in_out[128], op_in[128], fuse_uring_ent_in_out
HDR_SIZE = CODECS["fuse_uring_req_header"].size
HDR_OP_IN, HDR_ENT_IN_OUT, HDR_STRIDE = 128, 256, 512
IN_HEADER_SIZE, OUT_HEADER_SIZE = 40, 16
_ENDED = (errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED, errno.ENODEV)
_u32 = struct.Struct("=I")
_u64 = struct.Struct("=Q")
_cqe = struct.Struct("=Qi")
_sqe_head = struct.Struct("=BBHiQQIIQ")  # opcode flags ioprio fd off/cmd_op addr len rw_flags user_data
_cmd_req = struct.Struct("=QQH")  # fuse_uring_cmd_req at offset 48: flags, commit_id, qid


class _Params(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("sq_thread_cpu", ctypes.c_uint32), ("sq_thread_idle", ctypes.c_uint32),
                ("features", ctypes.c_uint32), ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                ("sq_off", ctypes.c_uint32 * 10), ("cq_off", ctypes.c_uint32 * 10)]


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _call(nr: int, *args: object, what: str) -> int:
    rc = _syscall(nr, *args)
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return int(rc)


def _address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def rebuild(header: bytes, payload: bytes) -> bytes:
    """The request in /dev/fuse's layout from an entry's buffers: the header says the whole length, and
    what the payload does not hold is the op's header (op_in).  Inconsistent sizes are clamped: the
    engine's decoder then answers the request with an error instead of the ring losing the entry."""
    if len(header) < HDR_SIZE:
        raise ValueError(f"a fuse_uring_req_header is {HDR_SIZE} bytes")
    length = _u32.unpack_from(header, 0)[0]
    payload_sz = min(_u32.unpack_from(header, HDR_ENT_IN_OUT + 16)[0], len(payload))
    op = max(0, min(128, length - IN_HEADER_SIZE - payload_sz))
    return header[:IN_HEADER_SIZE] + header[HDR_OP_IN:HDR_OP_IN + op] + payload[:payload_sz]


class Ring:
    """One FUSE-over-io_uring queue: Ring(dev_fd, qid, depth, payload_size, spare=0).  grow() registers
    one entry more, up to `spare` more: a lock wait keeps its entry for as long as it waits, and the
    kernel parks a queue's requests while every entry is busy."""

    def __init__(self, dev_fd: int, qid: int, depth: int, payload_size: int, spare: int = 0) -> None:
        if not (1 <= depth <= 256 and 0 <= spare <= 1024 and 0 <= qid <= 65535 and payload_size >= 8192):
            raise ValueError("Ring: depth 1..256, spare 0..1024, qid 0..65535, payload_size >= 8192")
        self.qid, self.depth, self.payload_size = qid, depth, payload_size
        self.capacity = cap = depth + spare
        self.served = 0
        self._lock = threading.Lock()
        self._waiting = False
        self._stopped = False
        self._fd = -1
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._wake_armed = False
        self._wake_buf = ctypes.c_uint64()
        p = _Params(flags=SETUP_SQE128 | SETUP_R_DISABLED | SETUP_CQSIZE, cq_entries=4 * (cap + 1))
        self._fd = _call(NR_IO_URING_SETUP, 2 * (cap + 1), ctypes.byref(p), what="io_uring_setup")
        try:
            self._map(p)
            files = (ctypes.c_int * 2)(dev_fd, self._wake_fd)
            _call(NR_IO_URING_REGISTER, self._fd, REGISTER_FILES, files, 2,
                  what="io_uring_register(IORING_REGISTER_FILES)")
            res = (ctypes.c_uint8 * 48)()  # three struct io_uring_restriction: u16 opcode, u8 sqe_op, ...
            struct.pack_into("=HB", res, 0, RESTRICTION_SQE_OP, OP_URING_CMD)
            struct.pack_into("=HB", res, 16, RESTRICTION_SQE_OP, OP_READ)
            struct.pack_into("=HB", res, 32, RESTRICTION_SQE_FLAGS_ALLOWED, IOSQE_FIXED_FILE)
            _call(NR_IO_URING_REGISTER, self._fd, REGISTER_RESTRICTIONS, res, 3,
                  what="io_uring_register(IORING_REGISTER_RESTRICTIONS)")
            _call(NR_IO_URING_REGISTER, self._fd, REGISTER_ENABLE_RINGS, None, 0,
                  what="io_uring_register(IORING_REGISTER_ENABLE_RINGS)")
        except BaseException:
            os.close(self._fd)
            os.close(self._wake_fd)
            self._fd = self._wake_fd = -1
            raise
        self._headers = mmap.mmap(-1, cap * HDR_STRIDE)
        self._payloads = mmap.mmap(-1, cap * payload_size,
                                   flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        hbase, pbase = _address(self._headers), _address(self._payloads)
        self._iovs = (_Iovec * (2 * cap))()
        for i in range(cap):
            self._iovs[2 * i] = _Iovec(hbase + i * HDR_STRIDE, HDR_SIZE)
            self._iovs[2 * i + 1] = _Iovec(pbase + i * payload_size, payload_size)
        self._iov_base = ctypes.addressof(self._iovs)
        self._last_cmd = [0] * cap
        self._commit_id = [0] * cap
        self._in_user = [False] * cap

    def _map(self, p: _Params) -> None:
        sq_len = p.sq_off[6] + p.sq_entries * 4
        cq_len = p.cq_off[5] + p.cq_entries * 16
        single = bool(p.features & FEAT_SINGLE_MMAP)
        if single:
            sq_len = cq_len = max(sq_len, cq_len)
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        self._sq = mmap.mmap(self._fd, sq_len, mmap.MAP_SHARED, prot, offset=OFF_SQ_RING)
        self._cq = self._sq if single else mmap.mmap(self._fd, cq_len, mmap.MAP_SHARED, prot, offset=OFF_CQ_RING)
        self._sqes = mmap.mmap(self._fd, p.sq_entries * SQE_SIZE, mmap.MAP_SHARED, prot, offset=OFF_SQES)
        self._sq_head, self._sq_tail, sq_mask = p.sq_off[0], p.sq_off[1], p.sq_off[2]
        self._sq_array = p.sq_off[6]
        self._sq_mask = _u32.unpack_from(self._sq, sq_mask)[0]
        self._cq_head, self._cq_tail = p.cq_off[0], p.cq_off[1]
        self._cq_mask = _u32.unpack_from(self._cq, p.cq_off[2])[0]
        self._cqes = p.cq_off[5]
        self._local_tail = _u32.unpack_from(self._sq, self._sq_tail)[0]

    def fileno(self) -> int:
        return self._fd

    def _prep(self, tag: int, opcode: int, cmd_op: int = 0, commit_id: int = 0) -> None:
        """Queue one SQE (the lock held); never full: at most capacity + 1 are ever unconsumed."""
        tail = self._local_tail
        slot = tail & self._sq_mask
        off = slot * SQE_SIZE
        sqes = self._sqes
        sqes[off:off + SQE_SIZE] = bytes(SQE_SIZE)
        if opcode == OP_URING_CMD:
            addr, n = (self._iov_base + 2 * tag * ctypes.sizeof(_Iovec), 2) if cmd_op == CMD_REGISTER else (0, 0)
            _sqe_head.pack_into(sqes, off, opcode, IOSQE_FIXED_FILE, 0, 0, cmd_op, addr, n, 0, tag)
            _cmd_req.pack_into(sqes, off + 48, 0, commit_id, self.qid)
            self._last_cmd[tag] = cmd_op
        else:  # the read on the eventfd (fixed file 1), at the current position
            _sqe_head.pack_into(sqes, off, opcode, IOSQE_FIXED_FILE, 0, 1, (1 << 64) - 1,
                                ctypes.addressof(self._wake_buf), 8, 0, tag)
        _u32.pack_into(self._sq, self._sq_array + 4 * slot, slot)
        self._local_tail = (tail + 1) & 0xFFFFFFFF
        _u32.pack_into(self._sq, self._sq_tail, self._local_tail)

    def _unsubmitted(self) -> int:
        return (self._local_tail - _u32.unpack_from(self._sq, self._sq_head)[0]) & 0xFFFFFFFF

    def register(self) -> None:
        """Queue FUSE_IO_URING_CMD_REGISTER for every entry; the owner's first wait() submits them."""
        if self._fd < 0:
            raise OSError(errno.EBADF, "io_uring ring closed")
        with self._lock:
            for i in range(self.depth):
                self._in_user[i] = False
                self._prep(i, OP_URING_CMD, CMD_REGISTER)
            if not self._wake_armed:
                self._wake_armed = True
                self._prep(WAKE_TAG, OP_READ)

    def grow(self) -> bool:
        """Register one entry more (True), or False when the spare ones are all in use.  Submitted by the
        owner: at its next wait() when called from it, else the owner is woken for it.  A new entry takes
        new requests; one the kernel parked while every entry was busy waits for a commit."""
        with self._lock:
            if self._fd < 0 or self._stopped or self.depth >= self.capacity:
                return False
            idx = self.depth
            self.depth += 1
            self._in_user[idx] = False
            self._prep(idx, OP_URING_CMD, CMD_REGISTER)
            wake = self._waiting
        if wake:
            os.eventfd_write(self._wake_fd, 1)
        return True

    def _request(self, idx: int) -> bytes:
        base, p = idx * HDR_STRIDE, idx * self.payload_size
        size = min(_u32.unpack_from(self._headers, base + HDR_ENT_IN_OUT + 16)[0], self.payload_size)
        return rebuild(self._headers[base:base + HDR_SIZE], self._payloads[p:p + size])

    def wait(self) -> tuple[bytes, Entry] | None:
        """The next request as (bytes, Entry), or None once the queue has ended."""
        while True:
            with self._lock:
                if self._fd < 0 or self._stopped:
                    return None
                head = _u32.unpack_from(self._cq, self._cq_head)[0]
                if head != _u32.unpack_from(self._cq, self._cq_tail)[0]:
                    tag, res = _cqe.unpack_from(self._cq, self._cqes + 16 * (head & self._cq_mask))
                    _u32.pack_into(self._cq, self._cq_head, (head + 1) & 0xFFFFFFFF)
                    if tag == WAKE_TAG:  # commits to submit, or close()
                        if res < 0 and res not in (-errno.EINTR, -errno.EAGAIN):
                            self._stopped = True
                            raise OSError(-res, f"io_uring read of the wake-up eventfd: {os.strerror(-res)}")
                        self._prep(WAKE_TAG, OP_READ)
                        continue
                    if tag >= self.depth:
                        self._stopped = True
                        return None
                    if res in (-errno.EAGAIN, -errno.EINTR):
                        self._prep(tag, OP_URING_CMD, self._last_cmd[tag], self._commit_id[tag])
                        if res == -errno.EAGAIN:
                            time.sleep(0.001)  # FUSE_INIT not answered yet
                        continue
                    if res < 0:
                        self._stopped = True
                        if -res in _ENDED:
                            return None
                        what = "REGISTER" if self._last_cmd[tag] == CMD_REGISTER else "COMMIT_AND_FETCH"
                        raise OSError(-res, f"FUSE_IO_URING_CMD_{what}: {os.strerror(-res)}")
                    self._in_user[tag] = True
                    unique = _u64.unpack_from(self._headers, tag * HDR_STRIDE + HDR_ENT_IN_OUT + 8)[0]
                    self._commit_id[tag] = unique
                    self.served += 1
                    return self._request(tag), Entry(self, tag, unique)
                n = self._unsubmitted()
                self._waiting = True
                fd = self._fd
            rc = _syscall(NR_IO_URING_ENTER, fd, n, 1, ENTER_GETEVENTS, None, 0)
            err = ctypes.get_errno() if rc < 0 else 0
            with self._lock:
                self._waiting = False
            if rc < 0 and err not in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                if err in (errno.EBADF, errno.ENXIO):
                    return None
                raise OSError(err, f"io_uring_enter: {os.strerror(err)}")

    def _fill(self, idx: int, parts: Sequence[bytes | bytearray | memoryview]) -> int:
        data = b"".join(parts)
        if len(data) < OUT_HEADER_SIZE:
            raise ValueError("a reply shorter than fuse_out_header")
        body = len(data) - OUT_HEADER_SIZE
        if body > self.payload_size:
            raise ValueError(f"a reply of more than {self.payload_size} bytes does not fit the ring's payload")
        base = idx * HDR_STRIDE
        self._headers[base:base + OUT_HEADER_SIZE] = data[:OUT_HEADER_SIZE]
        p = idx * self.payload_size
        self._payloads[p:p + body] = data[OUT_HEADER_SIZE:]
        _u32.pack_into(self._headers, base + HDR_ENT_IN_OUT + 16, body)
        return len(data)

    def _commit(self, e: Entry, parts: Sequence[bytes | bytearray | memoryview]) -> int | None:
        idx = e.idx
        with self._lock:
            if self._fd < 0 or self._stopped or not self._in_user[idx] or self._commit_id[idx] != e.unique:
                return None
        error: Exception | None = None
        try:
            total = self._fill(idx, parts)
        except (ValueError, TypeError) as exc:  # still answer, or the request and this entry wait forever
            error, total = exc, OUT_HEADER_SIZE
            base = idx * HDR_STRIDE
            self._headers[base:base + OUT_HEADER_SIZE] = struct.pack("=IiQ", OUT_HEADER_SIZE, -errno.EIO, e.unique)
            _u32.pack_into(self._headers, base + HDR_ENT_IN_OUT + 16, 0)
        wake = False
        with self._lock:
            if self._fd >= 0 and not self._stopped and self._in_user[idx]:
                self._in_user[idx] = False
                self._prep(idx, OP_URING_CMD, CMD_COMMIT_AND_FETCH, self._commit_id[idx])
                wake = self._waiting  # then this is not the owner: it submits when woken
        if wake:
            os.eventfd_write(self._wake_fd, 1)
        if error is not None:
            raise error
        return total

    def close(self) -> None:
        """End the queue; a wait() sleeping in the kernel returns None."""
        with self._lock:
            wake = self._fd >= 0 and not self._stopped and self._waiting
            self._stopped = True
        if wake:
            os.eventfd_write(self._wake_fd, 1)

    def __del__(self) -> None:
        for name in ("_fd", "_wake_fd"):
            if getattr(self, name, -1) >= 0:
                os.close(getattr(self, name))
                setattr(self, name, -1)


class Entry:
    """The reply sink of one request on a ring: call it with the reply's buffers."""

    __slots__ = ("idx", "ring", "unique")

    def __init__(self, ring: Ring, idx: int, unique: int) -> None:
        self.ring, self.idx, self.unique = ring, idx, unique

    def __call__(self, parts: Sequence[bytes | bytearray | memoryview]) -> int | None:
        return self.ring._commit(self, parts)
