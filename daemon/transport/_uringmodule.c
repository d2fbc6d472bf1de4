/* FUSE over io_uring: the ring mechanics of one queue, with the GIL released while the kernel works.
 *
 * Mechanics only, shaped like the pure-Python twin in uring_py.py (ctypes + mmap), which stays the
 * reference; the same tests run both.  One Ring is one FUSE queue (qid = a CPU): `depth` entries, each
 * a header buffer (struct fuse_uring_req_header: in_out[128], op_in[128], fuse_uring_ent_in_out) and a
 * payload buffer, registered with FUSE_IO_URING_CMD_REGISTER; grow() registers one more, up to `spare`
 * more (a lock wait keeps its entry for as long as it waits, and the kernel parks a queue's requests
 * when every entry is busy).  A completion hands one request over;
 * the reply goes back with FUSE_IO_URING_CMD_COMMIT_AND_FETCH, which also asks for the next request, so
 * a request costs one io_uring_enter(2) where /dev/fuse costs a read(2) and a write(2).
 *
 * wait() returns (request, Entry): the request rebuilt in /dev/fuse's layout (fuse_in_header, the op's
 * header, the payload), so the engine's op table is unchanged; calling Entry(iovecs) with the reply
 * (fuse_out_header + body) commits it, from any thread.  Only the owner thread (the one in wait())
 * ever submits: a command belongs to the task that submitted it, and the kernel cancels an entry whose
 * command's task exits (a pool or lock-waiter thread) and hands it the next request by task work on
 * that task.  A commit from another thread while the owner sleeps wakes it through an eventfd that the
 * ring always has a read pending on.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/io_uring.h>

#define HDR_IN_OUT 0
#define HDR_OP_IN 128
#define HDR_ENT_IN_OUT 256
#define HDR_SIZE 288      /* sizeof(struct fuse_uring_req_header) */
#define HDR_STRIDE 512
#define IN_HEADER_SIZE 40 /* struct fuse_in_header */
#define OUT_HEADER_SIZE 16
#define SQE_SIZE 128      /* IORING_SETUP_SQE128 */
#define CMD_REGISTER 1
#define CMD_COMMIT_AND_FETCH 2
#define WAKE_TAG UINT64_MAX /* the read on the eventfd: a commit from another thread, or close() */

enum { ST_KERNEL = 0, ST_USER = 1 };

typedef struct {
    PyObject_HEAD
    int ring_fd;
    int qid;
    unsigned depth;    /* entries registered (or queued to be) */
    unsigned capacity; /* depth + spare: what the buffers and the rings are sized for */
    size_t payload_size;
    void *sq_map, *cq_map, *sqe_map;
    size_t sq_len, cq_len, sqe_len;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    unsigned sq_local_tail;
    char *headers;
    char *payloads;
    size_t headers_len, payloads_len;
    struct iovec *iovs;
    uint8_t *last_cmd;
    uint64_t *commit_id;
    uint8_t *state;
    pthread_mutex_t lock;
    int waiting;  /* the owner sleeps in io_uring_enter */
    int wake_fd;  /* eventfd, fixed file 1 */
    int wake_armed;
    uint64_t wake_buf;
    int stopped;  /* the kernel ended the queue (unmount) or close() was called */
    uint64_t served;
} Ring;

typedef struct {
    PyObject_HEAD
    Ring *ring;
    unsigned idx;
    uint64_t unique;
} Entry;

static PyTypeObject RingType;
static PyTypeObject EntryType;

static int sys_setup(unsigned entries, struct io_uring_params *p) {
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
    return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
}

static int sys_register(int fd, unsigned op, void *arg, unsigned n) {
    return (int)syscall(__NR_io_uring_register, fd, op, arg, n);
}

static PyObject *os_error(int err, const char *what) {
    PyObject *msg = PyUnicode_FromFormat("%s: %s", what, strerror(err));
    if (msg == NULL) return NULL;
    PyObject *args = Py_BuildValue("(iO)", err, msg);
    Py_DECREF(msg);
    if (args == NULL) return NULL;
    PyObject *exc = PyObject_Call(PyExc_OSError, args, NULL);
    Py_DECREF(args);
    if (exc == NULL) return NULL;
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
    return NULL;
}

/* Queue one SQE (caller holds the lock).  Never full: at most capacity + 1 commands are ever unconsumed. */
static void prep(Ring *r, uint64_t tag, uint8_t opcode, uint32_t cmd_op, uint64_t commit_id) {
    unsigned tail = r->sq_local_tail;
    unsigned slot = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = (struct io_uring_sqe *)((char *)r->sqe_map + (size_t)slot * SQE_SIZE);
    memset(sqe, 0, SQE_SIZE);
    sqe->opcode = opcode;
    sqe->user_data = tag;
    if (opcode == IORING_OP_READ) {
        sqe->flags = IOSQE_FIXED_FILE;
        sqe->fd = 1;
        sqe->addr = (uint64_t)(uintptr_t)&r->wake_buf;
        sqe->len = 8;
        sqe->off = (uint64_t)-1;
    } else if (opcode == IORING_OP_URING_CMD) {
        unsigned idx = (unsigned)tag;
        sqe->flags = IOSQE_FIXED_FILE;
        sqe->fd = 0;
        sqe->cmd_op = cmd_op;
        if (cmd_op == CMD_REGISTER) {
            sqe->addr = (uint64_t)(uintptr_t)&r->iovs[2 * idx];
            sqe->len = 2;
        }
        uint8_t *cmd = (uint8_t *)sqe + 48; /* struct fuse_uring_cmd_req in the 80-byte command area */
        uint16_t qid = (uint16_t)r->qid;
        memcpy(cmd + 8, &commit_id, 8);
        memcpy(cmd + 16, &qid, 2);
        r->last_cmd[idx] = (uint8_t)cmd_op;
    }
    r->sq_array[slot] = slot;
    r->sq_local_tail = tail + 1;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
}

static unsigned unsubmitted(Ring *r) {
    return r->sq_local_tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
}

static void unmap(void **p, size_t len) {
    if (*p != NULL && *p != MAP_FAILED) munmap(*p, len);
    *p = NULL;
}

static void ring_release(Ring *r) {
    if (r->ring_fd >= 0) {
        close(r->ring_fd); /* cancels what the kernel still holds */
        r->ring_fd = -1;
    }
    if (r->wake_fd >= 0) {
        close(r->wake_fd);
        r->wake_fd = -1;
    }
    if (r->sq_map == r->cq_map) r->cq_map = NULL; /* one mapping (IORING_FEAT_SINGLE_MMAP) */
    unmap(&r->sq_map, r->sq_len);
    unmap(&r->cq_map, r->cq_len);
    unmap(&r->sqe_map, r->sqe_len);
    unmap((void **)&r->headers, r->headers_len);
    unmap((void **)&r->payloads, r->payloads_len);
    PyMem_Free(r->iovs);
    PyMem_Free(r->last_cmd);
    PyMem_Free(r->commit_id);
    PyMem_Free(r->state);
    r->iovs = NULL;
    r->last_cmd = NULL;
    r->commit_id = NULL;
    r->state = NULL;
}

static void Ring_dealloc(Ring *r) {
    ring_release(r);
    pthread_mutex_destroy(&r->lock);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

/* Ring(dev_fd, qid, depth, payload_size, spare=0): the io_uring and the buffers of one queue, with room
 * for `spare` entries more (payloads are reserved, not committed, until used).  The ring may only
 * carry URING_CMD on /dev/fuse and READ (of its eventfd), both on registered files only: a restricted
 * ring, as seccomp does not see its ops. */
static int Ring_init(Ring *r, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dev_fd", "qid", "depth", "payload_size", "spare", NULL};
    int dev_fd, qid;
    unsigned depth, spare = 0;
    Py_ssize_t payload_size;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiIn|I", kwlist, &dev_fd, &qid, &depth, &payload_size, &spare))
        return -1;
    if (depth < 1 || depth > 256 || spare > 1024 || qid < 0 || qid > 65535 || payload_size < 8192) {
        PyErr_SetString(PyExc_ValueError, "Ring: depth 1..256, spare 0..1024, qid 0..65535, payload_size >= 8192");
        return -1;
    }
    if (r->ring_fd > 0 || r->sq_map != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Ring already initialised");
        return -1;
    }
    r->ring_fd = -1;
    r->wake_fd = -1;
    r->qid = qid;
    r->depth = depth;
    r->capacity = depth + spare;
    unsigned cap = r->capacity;
    r->payload_size = (size_t)payload_size;
    pthread_mutex_init(&r->lock, NULL);
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_SQE128 | IORING_SETUP_R_DISABLED | IORING_SETUP_CQSIZE;
    p.cq_entries = 4 * (cap + 1);
    int fd = sys_setup(2 * (cap + 1), &p);
    if (fd < 0) {
        os_error(errno, "io_uring_setup");
        return -1;
    }
    r->ring_fd = fd;
    r->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cq_len > r->sq_len) r->sq_len = r->cq_len;
        r->cq_len = r->sq_len;
    }
    r->sq_map = mmap(NULL, r->sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    if (r->sq_map == MAP_FAILED) goto fail;
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        r->cq_map = r->sq_map;
    } else {
        r->cq_map = mmap(NULL, r->cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
        if (r->cq_map == MAP_FAILED) goto fail;
    }
    r->sqe_len = (size_t)p.sq_entries * SQE_SIZE;
    r->sqe_map = mmap(NULL, r->sqe_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (r->sqe_map == MAP_FAILED) goto fail;
    char *sq = r->sq_map, *cq = r->cq_map;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    r->sq_local_tail = *r->sq_tail;

    r->wake_fd = eventfd(0, EFD_CLOEXEC);
    if (r->wake_fd < 0) goto fail_errno_eventfd;
    int files[2] = {dev_fd, r->wake_fd};
    if (sys_register(fd, IORING_REGISTER_FILES, files, 2) < 0) {
        os_error(errno, "io_uring_register(IORING_REGISTER_FILES)");
        goto fail_raised;
    }
    struct io_uring_restriction res[3];
    memset(res, 0, sizeof res);
    res[0].opcode = IORING_RESTRICTION_SQE_OP;
    res[0].sqe_op = IORING_OP_URING_CMD;
    res[1].opcode = IORING_RESTRICTION_SQE_OP;
    res[1].sqe_op = IORING_OP_READ;
    res[2].opcode = IORING_RESTRICTION_SQE_FLAGS_ALLOWED;
    res[2].sqe_flags = IOSQE_FIXED_FILE;
    if (sys_register(fd, IORING_REGISTER_RESTRICTIONS, res, 3) < 0) {
        os_error(errno, "io_uring_register(IORING_REGISTER_RESTRICTIONS)");
        goto fail_raised;
    }
    if (sys_register(fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0) < 0) {
        os_error(errno, "io_uring_register(IORING_REGISTER_ENABLE_RINGS)");
        goto fail_raised;
    }

    r->headers_len = (size_t)cap * HDR_STRIDE;
    r->payloads_len = (size_t)cap * r->payload_size;
    r->headers = mmap(NULL, r->headers_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r->headers == MAP_FAILED) goto fail;
    r->payloads = mmap(NULL, r->payloads_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
    if (r->payloads == MAP_FAILED) goto fail;
    r->iovs = PyMem_Calloc(2 * cap, sizeof(struct iovec));
    r->last_cmd = PyMem_Calloc(cap, 1);
    r->commit_id = PyMem_Calloc(cap, sizeof(uint64_t));
    r->state = PyMem_Calloc(cap, 1);
    if (!r->iovs || !r->last_cmd || !r->commit_id || !r->state) {
        PyErr_NoMemory();
        goto fail_raised;
    }
    for (unsigned i = 0; i < cap; i++) {
        r->iovs[2 * i].iov_base = r->headers + (size_t)i * HDR_STRIDE;
        r->iovs[2 * i].iov_len = HDR_SIZE;
        r->iovs[2 * i + 1].iov_base = r->payloads + (size_t)i * r->payload_size;
        r->iovs[2 * i + 1].iov_len = r->payload_size;
    }
    return 0;
fail_errno_eventfd:
    os_error(errno, "eventfd");
    goto fail_raised;
fail:
    os_error(errno, "io_uring mmap");
fail_raised:
    ring_release(r);
    return -1;
}

/* register(): queue FUSE_IO_URING_CMD_REGISTER for every entry; the owner's first wait() submits them.
 * Only after the FUSE_INIT reply (the kernel answers EAGAIN before it, and wait() retries). */
static PyObject *Ring_register(Ring *r, PyObject *Py_UNUSED(ignored)) {
    if (r->ring_fd < 0) return os_error(EBADF, "io_uring ring closed");
    pthread_mutex_lock(&r->lock);
    for (unsigned i = 0; i < r->depth; i++) {
        r->state[i] = ST_KERNEL;
        prep(r, i, IORING_OP_URING_CMD, CMD_REGISTER, 0);
    }
    if (!r->wake_armed) {
        r->wake_armed = 1;
        prep(r, WAKE_TAG, IORING_OP_READ, 0, 0);
    }
    pthread_mutex_unlock(&r->lock);
    Py_RETURN_NONE;
}

/* grow(): register one entry more (True), or False when the spare entries are all in use.  Submitted
 * by the owner: at once when called from it (its next wait()), else the owner is woken for it.  A new
 * entry takes new requests; one the kernel parked while every entry was busy waits for a commit. */
static PyObject *Ring_grow(Ring *r, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&r->lock);
    if (r->ring_fd < 0 || r->stopped || r->depth >= r->capacity) {
        pthread_mutex_unlock(&r->lock);
        Py_RETURN_FALSE;
    }
    unsigned idx = r->depth++;
    r->state[idx] = ST_KERNEL;
    prep(r, idx, IORING_OP_URING_CMD, CMD_REGISTER, 0);
    int wake = r->waiting;
    pthread_mutex_unlock(&r->lock);
    if (wake) {
        uint64_t one = 1;
        if (write(r->wake_fd, &one, sizeof one) < 0) return os_error(errno, "eventfd write");
    }
    Py_RETURN_TRUE;
}

/* The request in /dev/fuse's layout.  The header says the whole length; what the payload does not
 * hold is the op's header (op_in).  Inconsistent sizes are clamped: the engine's decoder then answers
 * the request with an error instead of the ring losing the entry. */
static PyObject *rebuild(const char *h, const char *payload, size_t payload_size) {
    uint32_t len;
    uint32_t payload_sz;
    memcpy(&len, h + HDR_IN_OUT, 4);
    memcpy(&payload_sz, h + HDR_ENT_IN_OUT + 16, 4);
    if (payload_sz > payload_size) payload_sz = (uint32_t)payload_size;
    int64_t op = (int64_t)len - IN_HEADER_SIZE - payload_sz;
    if (op < 0) op = 0;
    if (op > 128) op = 128;
    PyObject *b = PyBytes_FromStringAndSize(NULL, IN_HEADER_SIZE + op + payload_sz);
    if (b == NULL) return NULL;
    char *d = PyBytes_AS_STRING(b);
    memcpy(d, h + HDR_IN_OUT, IN_HEADER_SIZE);
    memcpy(d + IN_HEADER_SIZE, h + HDR_OP_IN, (size_t)op);
    memcpy(d + IN_HEADER_SIZE + op, payload, payload_sz);
    return b;
}

static PyObject *request_bytes(Ring *r, unsigned idx) {
    return rebuild(r->headers + (size_t)idx * HDR_STRIDE, r->payloads + (size_t)idx * r->payload_size,
                   r->payload_size);
}

/* rebuild(header, payload): what wait() hands over for an entry holding these buffers (for tests). */
static PyObject *mod_rebuild(PyObject *Py_UNUSED(m), PyObject *args) {
    Py_buffer h, p;
    if (!PyArg_ParseTuple(args, "y*y*", &h, &p)) return NULL;
    PyObject *out = NULL;
    if (h.len < HDR_SIZE)
        PyErr_Format(PyExc_ValueError, "a fuse_uring_req_header is %d bytes", HDR_SIZE);
    else
        out = rebuild(h.buf, p.buf, (size_t)p.len);
    PyBuffer_Release(&h);
    PyBuffer_Release(&p);
    return out;
}

static PyMethodDef module_methods[] = {
    {"rebuild", mod_rebuild, METH_VARARGS, "The request wait() rebuilds from an entry's header and payload."},
    {NULL, NULL, 0, NULL},
};

/* wait(): the next request as (bytes, Entry), or None once the queue has ended (unmounted, aborted,
 * or close()).  Submits the queued commits and sleeps in the kernel with the GIL released. */
static PyObject *Ring_wait(Ring *r, PyObject *Py_UNUSED(ignored)) {
    for (;;) {
        pthread_mutex_lock(&r->lock);
        if (r->ring_fd < 0 || r->stopped) {
            pthread_mutex_unlock(&r->lock);
            Py_RETURN_NONE;
        }
        unsigned head = *r->cq_head;
        unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        if (head != tail) {
            struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
            uint64_t tag = cqe->user_data;
            int res = cqe->res;
            __atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
            if (tag == WAKE_TAG) { /* commits to submit, or close() */
                if (res < 0 && res != -EINTR && res != -EAGAIN) {
                    r->stopped = 1;
                    pthread_mutex_unlock(&r->lock);
                    return os_error(-res, "io_uring read of the wake-up eventfd");
                }
                prep(r, WAKE_TAG, IORING_OP_READ, 0, 0);
                pthread_mutex_unlock(&r->lock);
                continue;
            }
            if (tag >= r->depth) {
                r->stopped = 1;
                pthread_mutex_unlock(&r->lock);
                Py_RETURN_NONE;
            }
            unsigned idx = (unsigned)tag;
            if (res == -EAGAIN || res == -EINTR) { /* before FUSE_INIT was answered, or interrupted: again */
                prep(r, idx, IORING_OP_URING_CMD, r->last_cmd[idx], r->commit_id[idx]);
                pthread_mutex_unlock(&r->lock);
                if (res == -EAGAIN) {
                    Py_BEGIN_ALLOW_THREADS
                    usleep(1000);
                    Py_END_ALLOW_THREADS
                }
                continue;
            }
            if (res < 0) {
                r->stopped = 1;
                pthread_mutex_unlock(&r->lock);
                if (res == -ENOTCONN || res == -ECONNABORTED || res == -ECANCELED || res == -ENODEV) Py_RETURN_NONE;
                return os_error(-res, r->last_cmd[idx] == CMD_REGISTER ? "FUSE_IO_URING_CMD_REGISTER"
                                                                       : "FUSE_IO_URING_CMD_COMMIT_AND_FETCH");
            }
            r->state[idx] = ST_USER;
            memcpy(&r->commit_id[idx], r->headers + (size_t)idx * HDR_STRIDE + HDR_ENT_IN_OUT + 8, 8);
            r->served++;
            pthread_mutex_unlock(&r->lock);
            Entry *e = PyObject_New(Entry, &EntryType);
            if (e == NULL) return NULL;
            Py_INCREF(r);
            e->ring = r;
            e->idx = idx;
            e->unique = r->commit_id[idx];
            PyObject *req = request_bytes(r, idx);
            if (req == NULL) {
                Py_DECREF(e);
                return NULL;
            }
            PyObject *out = PyTuple_Pack(2, req, (PyObject *)e);
            Py_DECREF(req);
            Py_DECREF(e);
            return out;
        }
        unsigned n = unsubmitted(r);
        r->waiting = 1;
        int fd = r->ring_fd;
        pthread_mutex_unlock(&r->lock);
        int rc, err = 0;
        Py_BEGIN_ALLOW_THREADS
        rc = sys_enter(fd, n, 1, IORING_ENTER_GETEVENTS);
        if (rc < 0) err = errno;
        Py_END_ALLOW_THREADS
        pthread_mutex_lock(&r->lock);
        r->waiting = 0;
        pthread_mutex_unlock(&r->lock);
        if (rc < 0 && err != EINTR && err != EAGAIN && err != EBUSY) {
            if (err == EBADF || err == ENXIO) Py_RETURN_NONE; /* closed under us */
            return os_error(err, "io_uring_enter");
        }
    }
}

/* Copy the reply into the entry's buffers: fuse_out_header into in_out, the rest into the payload. */
static int fill_reply(Ring *r, unsigned idx, PyObject *parts, size_t *total) {
    PyObject *seq = PySequence_Fast(parts, "a reply is a sequence of buffers");
    if (seq == NULL) return -1;
    char *h = r->headers + (size_t)idx * HDR_STRIDE;
    char *payload = r->payloads + (size_t)idx * r->payload_size;
    size_t off = 0;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, i), &view, PyBUF_SIMPLE) < 0) {
            Py_DECREF(seq);
            return -1;
        }
        const char *src = view.buf;
        size_t len = (size_t)view.len;
        if (off < OUT_HEADER_SIZE) {
            size_t k = len < OUT_HEADER_SIZE - off ? len : OUT_HEADER_SIZE - off;
            memcpy(h + HDR_IN_OUT + off, src, k);
            src += k;
            len -= k;
            off += k;
        }
        if (len > 0) {
            if (off - OUT_HEADER_SIZE + len > r->payload_size) {
                PyBuffer_Release(&view);
                Py_DECREF(seq);
                PyErr_Format(PyExc_ValueError, "a reply of more than %zu bytes does not fit the ring's payload",
                             r->payload_size);
                return -1;
            }
            memcpy(payload + off - OUT_HEADER_SIZE, src, len);
            off += len;
        }
        PyBuffer_Release(&view);
    }
    Py_DECREF(seq);
    if (off < OUT_HEADER_SIZE) {
        PyErr_SetString(PyExc_ValueError, "a reply shorter than fuse_out_header");
        return -1;
    }
    uint32_t payload_sz = (uint32_t)(off - OUT_HEADER_SIZE);
    memcpy(h + HDR_ENT_IN_OUT + 16, &payload_sz, 4);
    *total = off;
    return 0;
}

/* Entry(iovecs): commit the reply and fetch the next request into this entry.  Returns the reply's
 * length, or None when the queue is gone (the reply is dropped, as /dev/fuse drops it with ENODEV). */
static PyObject *Entry_call(Entry *e, PyObject *args, PyObject *Py_UNUSED(kw)) {
    PyObject *parts;
    if (!PyArg_ParseTuple(args, "O", &parts)) return NULL;
    Ring *r = e->ring;
    unsigned idx = e->idx;
    pthread_mutex_lock(&r->lock);
    int gone = r->ring_fd < 0 || r->stopped || r->state[idx] != ST_USER || r->commit_id[idx] != e->unique;
    pthread_mutex_unlock(&r->lock);
    if (gone) Py_RETURN_NONE;
    size_t total = OUT_HEADER_SIZE;
    if (fill_reply(r, idx, parts, &total) < 0) {
        /* still answer, or the kernel's request (and this entry) would wait forever */
        uint32_t hdr[4] = {OUT_HEADER_SIZE, (uint32_t)-EIO, 0, 0};
        memcpy(&hdr[2], &e->unique, 8);
        memcpy(r->headers + (size_t)idx * HDR_STRIDE + HDR_IN_OUT, hdr, OUT_HEADER_SIZE);
        memset(r->headers + (size_t)idx * HDR_STRIDE + HDR_ENT_IN_OUT + 16, 0, 4);
    }
    int wake = 0;
    pthread_mutex_lock(&r->lock);
    if (r->ring_fd >= 0 && !r->stopped && r->state[idx] == ST_USER) {
        r->state[idx] = ST_KERNEL;
        prep(r, idx, IORING_OP_URING_CMD, CMD_COMMIT_AND_FETCH, r->commit_id[idx]);
        wake = r->waiting; /* then this is not the owner: it submits when woken */
    }
    pthread_mutex_unlock(&r->lock);
    if (wake) {
        uint64_t one = 1;
        if (write(r->wake_fd, &one, sizeof one) < 0) return os_error(errno, "eventfd write");
    }
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromSize_t(total);
}

/* close(): end the queue; a wait() sleeping in the kernel returns None.  The kernel completes what it
 * holds when the ring's fd closes (at dealloc) or at unmount. */
static PyObject *Ring_close(Ring *r, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&r->lock);
    int wake = r->ring_fd >= 0 && !r->stopped && r->waiting;
    r->stopped = 1;
    pthread_mutex_unlock(&r->lock);
    if (wake) {
        uint64_t one = 1;
        if (write(r->wake_fd, &one, sizeof one) < 0) return os_error(errno, "eventfd write");
    }
    Py_RETURN_NONE;
}

static PyObject *Ring_fileno(Ring *r, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(r->ring_fd);
}

static PyObject *Ring_get_served(Ring *r, void *Py_UNUSED(c)) {
    return PyLong_FromUnsignedLongLong(r->served);
}

static PyObject *Ring_get_qid(Ring *r, void *Py_UNUSED(c)) {
    return PyLong_FromLong(r->qid);
}

static PyObject *Ring_get_depth(Ring *r, void *Py_UNUSED(c)) {
    pthread_mutex_lock(&r->lock);
    unsigned depth = r->depth;
    pthread_mutex_unlock(&r->lock);
    return PyLong_FromUnsignedLong(depth);
}

static PyObject *Ring_get_capacity(Ring *r, void *Py_UNUSED(c)) {
    return PyLong_FromUnsignedLong(r->capacity);
}

static PyObject *Ring_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kw)) {
    Ring *r = (Ring *)type->tp_alloc(type, 0);
    if (r != NULL) {
        r->ring_fd = -1;
        r->wake_fd = -1;
    }
    return (PyObject *)r;
}

static PyMethodDef Ring_methods[] = {
    {"register", (PyCFunction)Ring_register, METH_NOARGS, "Queue FUSE_IO_URING_CMD_REGISTER for every entry."},
    {"grow", (PyCFunction)Ring_grow, METH_NOARGS, "Register one entry more (False when none is spare)."},
    {"wait", (PyCFunction)Ring_wait, METH_NOARGS, "The next request as (bytes, Entry), or None at the end."},
    {"close", (PyCFunction)Ring_close, METH_NOARGS, "End the queue; a sleeping wait() returns None."},
    {"fileno", (PyCFunction)Ring_fileno, METH_NOARGS, "The io_uring fd (-1 once released)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Ring_getset[] = {
    {"served", (getter)Ring_get_served, NULL, "requests handed over", NULL},
    {"qid", (getter)Ring_get_qid, NULL, "the FUSE queue (a CPU)", NULL},
    {"depth", (getter)Ring_get_depth, NULL, "entries registered", NULL},
    {"capacity", (getter)Ring_get_capacity, NULL, "entries it can grow to", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "daemon.transport._uring.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One FUSE-over-io_uring queue: Ring(dev_fd, qid, depth, payload_size, spare=0).",
    .tp_new = Ring_new,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
};

static void Entry_dealloc(Entry *e) {
    Py_XDECREF(e->ring);
    PyObject_Free(e);
}

static PyObject *Entry_get_unique(Entry *e, void *Py_UNUSED(c)) {
    return PyLong_FromUnsignedLongLong(e->unique);
}

static PyGetSetDef Entry_getset[] = {
    {"unique", (getter)Entry_get_unique, NULL, "the request's unique (its commit id)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EntryType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "daemon.transport._uring.Entry",
    .tp_basicsize = sizeof(Entry),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The reply sink of one request on a ring: call it with the reply's buffers.",
    .tp_dealloc = (destructor)Entry_dealloc,
    .tp_call = (ternaryfunc)Entry_call,
    .tp_getset = Entry_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "daemon.transport._uring",
    "FUSE-over-io_uring ring mechanics (twin: daemon/transport/uring_py.py).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__uring(void) {
    if (PyType_Ready(&RingType) < 0 || PyType_Ready(&EntryType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&RingType);
    Py_INCREF(&EntryType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0 ||
        PyModule_AddObject(m, "Entry", (PyObject *)&EntryType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
