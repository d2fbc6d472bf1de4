/* The passthrough filesystem's fast path: the commonest requests answered without the interpreter.
 *
 * Mechanics only.  The Python op table (daemon/server.py, daemon/passthrough/fs.py) stays the description
 * of every operation and its fallback: `FastPath(fs)(request[, chain]) -> reply | b"" | None` answers
 * GETATTR, LOOKUP, UNLINK, RMDIR, RELEASE, RELEASEDIR, FLUSH, STATFS, CREATE, OPEN, OPENDIR, READ, WRITE,
 * FORGET and BATCH_FORGET exactly as the Python path would (byte for byte, and the same tables after;
 * tests/test_daemon_fastpath.py replays the same requests through both).  The inode table is the Python one,
 * changed here under its own lock as the Python path changes it: a LOOKUP that finds a new inode, or a CREATE,
 * does InodeStore.find_or_add's usual case (a handle-held inode on a mount the store has an fd for; anything
 * else is find_or_add's own, called from here); FORGET takes nlookup down and drops the inode
 * (InodeStore.forget's usual case and _drop), leaving what InodeStore.forget logs to it; a new open file is a
 * fs.Handle in fs._handles.
 * Anything it does not fully handle (a malformed or unusual message, an unknown nodeid, a directory whose fd
 * is not cached, a handle with locks or a backing file, unusual open flags) gives None: the caller then
 * serves the request through Python, and nothing was changed.  b"" means served, no reply (FORGET).  A
 * reply is bytes, or for a READ into a vhost-user chain's buffers (`chain`, GuestPassthroughFS.read) the
 * tuple (header, fs.in_place(n)): the data is already in place.
 *
 * State: there is one inode table, the Python one (inodes.InodeStore); this reads it (and bumps nlookup
 * under the store's own lock) with the GIL held, so it is coherent with Python by construction.  A cached
 * fd (Inode.cached_fd: a directory's for name ops, a file's for GETATTR) is used with the GIL held throughout
 * (only a thread holding the GIL can evict or close it), and marked used for the cache's second chance; a
 * GETATTR that opened a handle-held inode from its handle gives the fd to the store's cache (keep_fd).  An
 * inode's own O_PATH fd and an fd opened from a handle are used with the GIL released, as the Python path
 * does, with the inode lent meanwhile (InodeStore._lend: a FORGET then leaves its fd and its mount's fd open
 * for the op, the last user closes them).
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <sys/sysmacros.h>
#include <unistd.h>
#include <linux/fuse.h>

#include "../../dissectors/ring/ring_answer.h"

#ifndef STATX_MNT_ID
#define STATX_MNT_ID 0x1000U
#endif
#define MAX_HANDLE_SZ_ 128
#define NAME_MAX_ 255
#define NOPS 64
#define WRITE_IOV 64 /* a WRITE's data segments in the iovec on the stack; more take a heap array */
#define NEW_RUN 2 /* new inodes in a row under a directory after which its LOOKUPs open the name first */

/* Opcodes and flag bits come from the spec tables through the constructor; the struct layouts are the
 * kernel's (linux/fuse.h), checked against the spec's sizes by fast.py at start-up. */
enum { K_LOOKUP, K_FORGET, K_GETATTR, K_STATFS, K_RELEASE, K_FLUSH, K_RELEASEDIR, K_BATCH_FORGET, K_UNLINK, K_RMDIR,
       K_CREATE, K_OPEN, K_OPENDIR, K_READ, K_WRITE, K_N };
static const char *const op_keys[K_N] = {"LOOKUP", "FORGET", "GETATTR", "STATFS", "RELEASE", "FLUSH",
                                         "RELEASEDIR", "BATCH_FORGET", "UNLINK", "RMDIR", "CREATE", "OPEN",
                                         "OPENDIR", "READ", "WRITE"};

/* Open flags the fast path leaves to Python: O_DIRECTORY (OPEN answers EINVAL; CREATE would make the host
 * refuse), O_PATH and O_TMPFILE (not what a FUSE open means), O_ASYNC (F_SETFL with it needs an owner), and
 * bit 31 (os.open takes a C int: Python answers what its OverflowError becomes). */
#define OPEN_LEFT_TO_PYTHON (O_DIRECTORY | O_PATH | (O_TMPFILE & ~O_DIRECTORY) | O_ASYNC | 0x80000000u)

typedef struct {
    PyObject_HEAD
    PyObject *fs;
    unsigned int op[K_N];
    unsigned int getattr_fh;    /* FUSE_GETATTR_FH */
    unsigned int attr_submount; /* FUSE_ATTR_SUBMOUNT */
    unsigned long long max_message; /* longer messages are the decoder's to refuse */
    PyObject *stat_type;            /* syscalls.Statx: what InodeStore.find_or_add takes */
    PyObject *handle_type;          /* fs.Handle: an entry of fs._handles */
    PyObject *prepare_thread;       /* fs._prepare_thread(privileged): may this thread create (umask 0)? */
    PyObject *not_owned;            /* {"owned": False}: find_or_add of an open file's fd */
    unsigned int open_kill_suidgid; /* FUSE_OPEN_KILL_SUIDGID */
    unsigned int write_kill_suidgid; /* FUSE_WRITE_KILL_SUIDGID */
    unsigned long long inline_io_max; /* bigger READs go to the engine's pool: Python's */
    unsigned long long inline_write_max; /* bigger WRITEs too (the engine's INLINE_WRITE_MAX) */
    unsigned long long served[NOPS];
    unsigned long long fallbacks;
    PyObject *errors; /* {(opcode, errno): count} */
} FastPath;

static PyObject *S_store, *S_by_id, *S_by_key, *S_lock, *S_fd, *S_mode, *S_mnt_id, *S_handles, *S_is_dir,
    *S_lock_fds, *S_backing, *S_users, *S_unclosed, *S_timeout, *S_submounts, *S_acquire, *S_release,
    *S_batch_forget, *S_zero_gen, *S_opts, *S_readonly, *S_find_or_add, *S_next_fh, *S_fopen_file, *S_fopen_dir,
    *S_writeback, *S_passthrough, *S_switch_creds, *S_kernel_groups, *S_proc_groups, *S_proc, *S_chain_for,
    *S_writable, *S_in_place, *S_keep_fd, *S_drop_cached_fd, *S_orphans, *S_settle_locked, *S_refs, *S_cached,
    *S_mounts, *S_generation_, *S_next_id, *S_fd_cache_max, *S_evict_locked;

/* This thread's answer from fs._prepare_thread (Python keeps the same in a threading.local): 0 not asked
 * yet, 1 its own umask 0 (a serving thread), -1 not (the main thread: Python switches the process umask). */
static __thread signed char thread_ready;

/* ------------------------------------------------------------------ small helpers */
static int get_long(PyObject *o, PyObject *name, long long *out) {
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL) return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static PyObject *reply_new(size_t body, uint64_t unique, char **out) {
    PyObject *r = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(sizeof(struct fuse_out_header) + body));
    if (r == NULL) return NULL;
    char *p = PyBytes_AS_STRING(r);
    struct fuse_out_header h = {(uint32_t)(sizeof h + body), 0, unique};
    memcpy(p, &h, sizeof h);
    memset(p + sizeof h, 0, body);
    *out = p + sizeof h;
    return r;
}

static int count_error(FastPath *self, unsigned int opcode, int err) {
    PyObject *key = Py_BuildValue("(Ii)", opcode, err);
    if (key == NULL) return -1;
    PyObject *old = PyDict_GetItemWithError(self->errors, key);
    long long n = old != NULL ? PyLong_AsLongLong(old) : 0;
    PyObject *v = PyLong_FromLongLong(n + 1);
    int rc = v == NULL ? -1 : PyDict_SetItem(self->errors, key, v);
    Py_XDECREF(v);
    Py_DECREF(key);
    return rc;
}

/* The Python path's error reply: out_header with -errno (EIO outside 1..4095), counted as the engine does. */
static PyObject *reply_error(FastPath *self, unsigned int opcode, uint64_t unique, int err) {
    if (err < 1 || err > 4095) err = EIO;
    self->served[opcode]++;
    if (count_error(self, opcode, err) < 0) return NULL;
    PyObject *r = PyBytes_FromStringAndSize(NULL, sizeof(struct fuse_out_header));
    if (r == NULL) return NULL;
    struct fuse_out_header h = {sizeof h, -err, unique};
    memcpy(PyBytes_AS_STRING(r), &h, sizeof h);
    return r;
}

static PyObject *fallback(FastPath *self) {
    self->fallbacks++;
    Py_RETURN_NONE;
}

/* fs.<name> / fs.opts.<name> as a truth value: 1, 0, or -1 with a Python error. */
static int truth_of(PyObject *o, PyObject *name) {
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL) return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

static int fs_true(FastPath *self, PyObject *name) {
    return truth_of(self->fs, name);
}

static int opt_true(FastPath *self, PyObject *name) {
    PyObject *opts = PyObject_GetAttr(self->fs, S_opts);
    if (opts == NULL) return -1;
    int r = truth_of(opts, name);
    Py_DECREF(opts);
    return r;
}

/* fuse_attr from a stat: the order and rules of server._attr_values (seconds two's complement, rdev cut). */
static void attr_from_stat(struct fuse_attr *a, const struct stat *st, uint32_t flags) {
    a->ino = st->st_ino;
    a->size = (uint64_t)st->st_size;
    a->blocks = (uint64_t)st->st_blocks;
    a->atime = (uint64_t)st->st_atim.tv_sec;
    a->mtime = (uint64_t)st->st_mtim.tv_sec;
    a->ctime = (uint64_t)st->st_ctim.tv_sec;
    a->atimensec = (uint32_t)st->st_atim.tv_nsec;
    a->mtimensec = (uint32_t)st->st_mtim.tv_nsec;
    a->ctimensec = (uint32_t)st->st_ctim.tv_nsec;
    a->mode = st->st_mode;
    a->nlink = (uint32_t)st->st_nlink;
    a->uid = st->st_uid;
    a->gid = st->st_gid;
    a->rdev = (uint32_t)(st->st_rdev & 0xFFFFFFFFu);
    a->blksize = (uint32_t)st->st_blksize;
    a->flags = flags;
}

static void attr_from_statx(struct fuse_attr *a, const struct statx *s, uint32_t flags) {
    a->ino = s->stx_ino;
    a->size = s->stx_size;
    a->blocks = s->stx_blocks;
    a->atime = (uint64_t)s->stx_atime.tv_sec;
    a->mtime = (uint64_t)s->stx_mtime.tv_sec;
    a->ctime = (uint64_t)s->stx_ctime.tv_sec;
    a->atimensec = s->stx_atime.tv_nsec;
    a->mtimensec = s->stx_mtime.tv_nsec;
    a->ctimensec = s->stx_ctime.tv_nsec;
    a->mode = s->stx_mode;
    a->nlink = s->stx_nlink;
    a->uid = s->stx_uid;
    a->gid = s->stx_gid;
    a->rdev = (uint32_t)(makedev(s->stx_rdev_major, s->stx_rdev_minor) & 0xFFFFFFFFu);
    a->blksize = s->stx_blksize;
    a->flags = flags;
}

/* server._split_timeout: (int(t), int((t - int(t)) * 1e9)) */
static void split_timeout(double t, uint64_t *s, uint32_t *ns) {
    long long whole = (long long)t;
    *s = (uint64_t)whole;
    *ns = (uint32_t)(long long)((t - (double)whole) * 1e9);
}

typedef struct {
    PyObject *by_id, *by_key, *cached, *mounts; /* InodeStore's tables */
} Tables;

static int tables_of(PyObject *store, Tables *t) {
    t->by_id = PyObject_GetAttr(store, S_by_id);
    t->by_key = t->by_id != NULL ? PyObject_GetAttr(store, S_by_key) : NULL;
    t->cached = t->by_key != NULL ? PyObject_GetAttr(store, S_cached) : NULL;
    t->mounts = t->cached != NULL ? PyObject_GetAttr(store, S_mounts) : NULL;
    return t->mounts != NULL ? 0 : -1;
}

static void tables_done(Tables *t) {
    Py_CLEAR(t->by_id);
    Py_CLEAR(t->by_key);
    Py_CLEAR(t->cached);
    Py_CLEAR(t->mounts);
}

/* os.close(fd): 0, or -1 with its OSError. */
static int close_or_raise(long long fd) {
    if (close((int)fd) == 0) return 0;
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

static int set_long(PyObject *o, PyObject *name, long long v) {
    PyObject *x = PyLong_FromLongLong(v);
    if (x == NULL) return -1;
    int rc = PyObject_SetAttr(o, name, x);
    Py_DECREF(x);
    return rc;
}

/* A file handle as name_to_handle_at fills it: struct file_handle and its bytes, on the stack or inline. */
typedef union {
    struct file_handle fh;
    unsigned char raw[sizeof(struct file_handle) + MAX_HANDLE_SZ_];
} HandleBuf;

/* ------------------------------------------------------------------ the Inode */
/* inodes.Inode as a C object (its twin: the dataclass there, which the Python op table's stores hold): the same
 * fields in the same constructor order (INODE_FIELDS, checked against the dataclass by fs.py), read and written
 * by Python as attributes and here as struct members, so a new inode costs one allocation and no attribute
 * traffic.  The file handle is kept inline (Inode.handle makes the bytes when Python asks).  Not a GC type: its
 * only reference (mount, a MountFd) never leads back to an inode. */
typedef struct {
    PyObject_HEAD
    unsigned long long nodeid, generation, dev, ino, mnt_id, parent_mnt_id;
    long long nlookup, lent;
    unsigned int mode; /* file type bits (S_IFMT) + permissions at lookup time */
    int fd;            /* O_PATH fd, or -1 when held by handle */
    int cached_fd;     /* a handle-held inode's O_PATH fd while it is in the store's cache */
    char used;         /* cached_fd was used since the eviction scan last passed it (second chance) */
    unsigned char new_run; /* C only: LOOKUPs under this directory that found a new inode, in a row (op_lookup) */
    PyObject *mount;   /* MountFd or None */
    unsigned int handle_len; /* 0: no handle; else sizeof(struct file_handle) + handle_bytes */
    HandleBuf handle;
} InodeObject;

static PyTypeObject InodeType;
#define INODE(o) ((InodeObject *)(o))
#define IS_INODE(o) Py_IS_TYPE((o), &InodeType)

static char *inode_kw[] = {"nodeid", "generation", "dev", "ino", "mnt_id", "mode", "fd", "handle", "mount",
                           "nlookup", "parent_mnt_id", "cached_fd", "lent", "used", NULL};

/* A handle's bytes (struct file_handle + f_handle, as name_to_handle_at fills it) into the inode: 0, or -1 with
 * a Python error for anything that is not one. */
static int inode_set_handle(InodeObject *self, PyObject *v) {
    if (v == NULL || v == Py_None) {
        self->handle_len = 0;
        return 0;
    }
    if (!PyBytes_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "Inode.handle: bytes or None");
        return -1;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(v);
    struct file_handle fh;
    if ((size_t)n < sizeof fh || (size_t)n > sizeof self->handle.raw) {
        PyErr_SetString(PyExc_ValueError, "Inode.handle: not a file handle");
        return -1;
    }
    memcpy(&fh, PyBytes_AS_STRING(v), sizeof fh);
    if (fh.handle_bytes != (size_t)n - sizeof fh) {
        PyErr_SetString(PyExc_ValueError, "Inode.handle: its length is not its handle_bytes");
        return -1;
    }
    memcpy(self->handle.raw, PyBytes_AS_STRING(v), (size_t)n);
    self->handle_len = (unsigned int)n;
    return 0;
}

static int inode_init(PyObject *op, PyObject *args, PyObject *kwargs) {
    InodeObject *self = INODE(op);
    unsigned long long nodeid, generation, dev, ino, mnt_id, parent_mnt_id = 0;
    unsigned int mode;
    int fd = -1, cached_fd = -1, used = 0;
    long long nlookup = 0, lent = 0;
    PyObject *handle = Py_None, *mount = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "KKKKKI|iOOLKiLp:Inode", inode_kw, &nodeid, &generation, &dev,
                                     &ino, &mnt_id, &mode, &fd, &handle, &mount, &nlookup, &parent_mnt_id,
                                     &cached_fd, &lent, &used))
        return -1;
    if (inode_set_handle(self, handle) < 0) return -1;
    self->nodeid = nodeid;
    self->generation = generation;
    self->dev = dev;
    self->ino = ino;
    self->mnt_id = mnt_id;
    self->mode = mode;
    self->fd = fd;
    Py_INCREF(mount);
    Py_XSETREF(self->mount, mount);
    self->nlookup = nlookup;
    self->parent_mnt_id = parent_mnt_id;
    self->cached_fd = cached_fd;
    self->lent = lent;
    self->used = (char)used;
    return 0;
}

static PyObject *inode_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    (void)args;
    (void)kwargs;
    PyObject *op = type->tp_alloc(type, 0);
    if (op == NULL) return NULL;
    InodeObject *self = INODE(op);
    self->fd = self->cached_fd = -1;
    Py_INCREF(Py_None);
    self->mount = Py_None;
    return op;
}

static void inode_dealloc(PyObject *op) {
    Py_CLEAR(INODE(op)->mount);
    Py_TYPE(op)->tp_free(op);
}

static PyObject *inode_get_handle(PyObject *op, void *unused) {
    (void)unused;
    InodeObject *self = INODE(op);
    if (!self->handle_len) Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)self->handle.raw, (Py_ssize_t)self->handle_len);
}

static PyObject *inode_key(PyObject *op, void *unused) {
    (void)unused;
    InodeObject *self = INODE(op);
    return Py_BuildValue("(KKK)", self->dev, self->ino, self->mnt_id);
}

static PyObject *inode_is_dir(PyObject *op, void *unused) {
    (void)unused;
    return PyBool_FromLong(S_ISDIR(INODE(op)->mode));
}

static PyObject *inode_repr(PyObject *op) {
    InodeObject *self = INODE(op);
    PyObject *handle = inode_get_handle(op, NULL);
    if (handle == NULL) return NULL;
    PyObject *r = PyUnicode_FromFormat(
        "Inode(nodeid=%llu, generation=%llu, dev=%llu, ino=%llu, mnt_id=%llu, mode=%u, fd=%d, handle=%R, mount=%R, "
        "nlookup=%lld, parent_mnt_id=%llu, cached_fd=%d, lent=%lld, used=%s)", self->nodeid, self->generation,
        self->dev, self->ino, self->mnt_id, self->mode, self->fd, handle, self->mount, self->nlookup,
        self->parent_mnt_id, self->cached_fd, self->lent, self->used ? "True" : "False");
    Py_DECREF(handle);
    return r;
}

/* What identifies the inode is fixed at its making (read-only: never unset under the C); the rest is the store's. */
#define INODE_MEMBER(name, type, flags) {#name, type, offsetof(InodeObject, name), flags, NULL}
static PyMemberDef inode_members[] = {
    INODE_MEMBER(nodeid, T_ULONGLONG, READONLY),  INODE_MEMBER(generation, T_ULONGLONG, READONLY),
    INODE_MEMBER(dev, T_ULONGLONG, READONLY),     INODE_MEMBER(ino, T_ULONGLONG, READONLY),
    INODE_MEMBER(mnt_id, T_ULONGLONG, READONLY),  INODE_MEMBER(mode, T_UINT, READONLY),
    INODE_MEMBER(mount, T_OBJECT, READONLY),      INODE_MEMBER(parent_mnt_id, T_ULONGLONG, READONLY),
    INODE_MEMBER(fd, T_INT, 0),                   INODE_MEMBER(nlookup, T_LONGLONG, 0),
    INODE_MEMBER(cached_fd, T_INT, 0),            INODE_MEMBER(lent, T_LONGLONG, 0),
    INODE_MEMBER(used, T_BOOL, 0),                {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef inode_getset[] = {
    {"handle", inode_get_handle, NULL, "the file handle's bytes, or None (held by its O_PATH fd)", NULL},
    {"key", inode_key, NULL, "(dev, ino, mnt_id): its identity in the store", NULL},
    {"is_dir", inode_is_dir, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject InodeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "daemon.passthrough._fast.Inode",
    .tp_basicsize = sizeof(InodeObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Inode(nodeid, generation, dev, ino, mnt_id, mode, fd=-1, handle=None, mount=None, nlookup=0,"
              " parent_mnt_id=0, cached_fd=-1, lent=0, used=False): inodes.Inode, as a C object",
    .tp_new = inode_new,
    .tp_init = inode_init,
    .tp_dealloc = inode_dealloc,
    .tp_repr = inode_repr,
    .tp_members = inode_members,
    .tp_getset = inode_getset,
};

/* A new inode for the store's tables, as InodeStore._find_or_add makes one (nlookup 1, not cached yet). */
static PyObject *inode_make(unsigned long long nodeid, unsigned long long generation, const struct statx *sx,
                            int fd, const unsigned char *handle, unsigned int handle_len, PyObject *mount,
                            unsigned long long parent_mnt_id) {
    PyObject *op = inode_new(&InodeType, NULL, NULL);
    if (op == NULL) return NULL;
    InodeObject *self = INODE(op);
    self->nodeid = nodeid;
    self->generation = generation;
    self->dev = makedev(sx->stx_dev_major, sx->stx_dev_minor);
    self->ino = sx->stx_ino;
    self->mnt_id = (sx->stx_mask & STATX_MNT_ID) ? sx->stx_mnt_id : 0;
    self->mode = sx->stx_mode;
    self->fd = fd;
    Py_INCREF(mount);
    Py_SETREF(self->mount, mount);
    self->nlookup = 1;
    self->parent_mnt_id = parent_mnt_id;
    if (handle_len) memcpy(self->handle.raw, handle, handle_len);
    self->handle_len = handle_len;
    return op;
}

/* ------------------------------------------------------------------ inode access */
typedef struct {
    PyObject *inode; /* borrowed from the store's dict (valid while the GIL is held) */
    int fd;          /* an fd for *at() calls, or -1 */
    int own;         /* fd was opened here (from the handle): close it */
    int gil;         /* fd is the cached directory fd: use it with the GIL held */
    long long mode;
    PyObject *lent;  /* the store, while the inode is lent (a reference to each): path_fd_done gives it back */
} PathFd;

static int open_from_handle(PyObject *store, PyObject *inode, PathFd *p, int *err);
static int unpinned(PyObject *store, PyObject *inode, int fd, int *again);
static int under_lock(PyObject *store, int (*call)(void *), void *arg);

/* ------------------------------------------------------------------ lending (InodeStore._lend, _give_back) */
/* An op that uses an inode's O_PATH fd or its mount's fd with the GIL let go lends the inode first, under the
 * store's lock, and gives it back at its end: a FORGET meanwhile (a hostile guest's, on the hiprio queue) then
 * leaves the fds open for the last user to close, as the C virtiofsd's lo_inode refcount does, so the fd's
 * number cannot be reused under the op by the daemon's next open.  A cached fd used with the GIL held needs no
 * lending (only a thread holding the GIL closes one).  The root's fd lives as long as the store. */
typedef struct {
    PyObject *store, *inode;
    int ok;
} Lending;

static int lend_locked(void *arg) {
    Lending *l = arg;
    InodeObject *ino = INODE(l->inode);
    l->ok = ino->nlookup > 0;
    if (l->ok) ino->lent++;
    return 0;
}

/* 1 lent (a reference to the inode and the store taken), 0 forgotten already (Python's: EBADF), -1 error. */
static int lend(PyObject *store, PyObject *inode) {
    Lending l = {store, inode, 0};
    if (under_lock(store, lend_locked, &l) < 0) return -1;
    if (l.ok) {
        Py_INCREF(store);
        Py_INCREF(inode);
    }
    return l.ok;
}

static int give_back_locked(void *arg) {
    Lending *l = arg;
    InodeObject *ino = INODE(l->inode);
    if (--ino->lent != 0) return 0;
    if (ino->nlookup > 0) {
        PyObject *orphans = PyObject_GetAttr(l->store, S_orphans);
        if (orphans == NULL) return -1;
        Py_ssize_t n = PyObject_Length(orphans);
        Py_DECREF(orphans);
        if (n <= 0) return (int)n;
    }
    PyObject *r = PyObject_CallMethodOneArg(l->store, S_settle_locked, l->inode); /* closes what was let go */
    Py_XDECREF(r);
    return r != NULL ? 0 : -1;
}

/* The end of a lending (the references lend took go): 0, or -1 with a Python error. */
static int give_back(PyObject *store, PyObject *inode) {
    Lending l = {store, inode, 0};
    int rc = under_lock(store, give_back_locked, &l);
    Py_DECREF(inode);
    Py_DECREF(store);
    return rc;
}

/* give_back on an error path: the Python error already set is kept (over one of the give-back's own). */
static void give_back_keeping(PyObject *store, PyObject *inode) {
    PyObject *exc_type, *exc_val, *exc_tb;
    PyErr_Fetch(&exc_type, &exc_val, &exc_tb);
    if (give_back(store, inode) < 0 && exc_type != NULL) PyErr_Clear();
    if (exc_type != NULL) PyErr_Restore(exc_type, exc_val, exc_tb);
}

/* inodes.PathFd without side effects: the inode's O_PATH fd (the inode lent until path_fd_done), its cached
 * directory fd, or (a file) an fd opened from its handle.  1: ready; 0: fall back (a directory without a cached
 * fd: Python opens and caches it; an inode forgotten meanwhile); -1 with errno in *err: the open failed
 * (answered as Python would); -2: a Python error. */
static int path_fd(PyObject *store, PyObject *inode, PathFd *p, int *err) {
    InodeObject *ino = INODE(inode);
    p->inode = inode;
    p->fd = -1;
    p->own = p->gil = 0;
    p->mode = ino->mode;
    p->lent = NULL;
    if (ino->fd >= 0) {
        if (ino->nodeid != FUSE_ROOT_ID) {
            int rc = lend(store, inode);
            if (rc <= 0) return rc < 0 ? -2 : 0;
            p->lent = store;
        }
        p->fd = ino->fd; /* read once lent: open until it is given back */
        return 1;
    }
    if (S_ISDIR(p->mode)) {
        if (ino->cached_fd < 0) return 0;
        ino->used = 1; /* the cache's second chance */
        p->fd = ino->cached_fd;
        p->gil = 1;
        return 1;
    }
    return open_from_handle(store, inode, p, err);
}

/* An O_PATH fd opened from the inode's handle (GIL released), the caller's to close (p->own): 1 ready; 0 fall
 * back (no usable handle); -1 with errno in *err (ESTALE: the inode is gone); -2 a Python error. */
static int open_from_handle(PyObject *store, PyObject *inode, PathFd *p, int *err) {
    InodeObject *ino = INODE(inode);
    long long mfd = -1;
    if (!ino->handle_len || ino->mount == Py_None) return 0;
    int rc = lend(store, inode); /* its mount's fd stays open while it is used */
    if (rc <= 0) return rc < 0 ? -2 : 0;
    if (get_long(ino->mount, S_fd, &mfd) < 0) {
        give_back_keeping(store, inode);
        return -2;
    }
    HandleBuf hb;
    memcpy(hb.raw, ino->handle.raw, ino->handle_len);
    int nfd, e = 0, again = 0;
    Py_BEGIN_ALLOW_THREADS
    nfd = open_by_handle_at((int)mfd, &hb.fh, O_PATH | O_CLOEXEC);
    if (nfd < 0) e = errno;
    Py_END_ALLOW_THREADS
    if (nfd >= 0 && unpinned(store, inode, nfd, &again) < 0) {
        close(nfd);
        give_back_keeping(store, inode);
        return -2;
    }
    if (again) {
        close(nfd);
        Py_BEGIN_ALLOW_THREADS
        nfd = open_by_handle_at((int)mfd, &hb.fh, O_PATH | O_CLOEXEC);
        if (nfd < 0) e = errno;
        Py_END_ALLOW_THREADS
    }
    if (give_back(store, inode) < 0) {
        if (nfd >= 0) close(nfd);
        return -2;
    }
    if (nfd < 0) {
        *err = e;
        return -1;
    }
    p->fd = nfd;
    p->own = 1;
    return 1;
}

/* InodeStore._open_handle's rule, after a file's handle opened as `fd`: a cached fd keeps the host inode
 * alive, so when the inode has one and `fd` shows no link left, the cached fd is let go (drop_cached_fd) and
 * *again set: the caller closes `fd` and asks the handle again (ESTALE once the inode is gone), as it would
 * have answered without the cache.  0, or -1 with a Python error. */
static int unpinned(PyObject *store, PyObject *inode, int fd, int *again) {
    struct stat st;
    *again = 0;
    if (INODE(inode)->cached_fd < 0 || S_ISDIR(INODE(inode)->mode) || fstat(fd, &st) != 0 || st.st_nlink > 0) return 0;
    PyObject *one = PyLong_FromLong(1); /* the caller has the inode lent (open_from_handle, op_open) */
    PyObject *r = one != NULL ? PyObject_CallMethodObjArgs(store, S_drop_cached_fd, inode, one, NULL) : NULL;
    Py_XDECREF(one);
    if (r == NULL) return -1;
    Py_DECREF(r);
    *again = 1;
    return 0;
}

static void path_fd_done(PathFd *p) {
    if (p->own && p->fd >= 0) close(p->fd);
    p->fd = -1;
    PyObject *store = p->lent;
    p->lent = NULL;
    if (store != NULL && give_back(store, p->inode) < 0) /* the answer stands; the error is reported */
        PyErr_WriteUnraisable(p->inode);
}

static int do_fstat(PathFd *p, struct stat *st) {
    int rc, e = 0;
    if (p->gil) {
        rc = fstat(p->fd, st);
        return rc == 0 ? 0 : errno;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = fstat(p->fd, st);
    if (rc != 0) e = errno;
    Py_END_ALLOW_THREADS
    return rc == 0 ? 0 : e;
}

/* Borrowed: the inode of `nodeid`, or NULL (no error set) when the store has none. */
static PyObject *inode_of(PyObject *by_id, uint64_t nodeid) {
    PyObject *key = PyLong_FromUnsignedLongLong(nodeid);
    if (key == NULL) return NULL;
    PyObject *ino = PyDict_GetItemWithError(by_id, key);
    Py_DECREF(key);
    return ino != NULL && IS_INODE(ino) ? ino : NULL; /* a store of the dataclass's inodes is Python's */
}

/* A new reference to the inode of `nodeid`, or NULL: a Python error, or (none set) the store has none. */
static PyObject *inode_ref(PyObject *store, uint64_t nodeid) {
    PyObject *by_id = PyObject_GetAttr(store, S_by_id);
    if (by_id == NULL) return NULL;
    PyObject *ino = inode_of(by_id, nodeid);
    Py_XINCREF(ino);
    Py_DECREF(by_id);
    return ino;
}

/* A new reference to fs._handles[fh], or NULL: an error set, or no such handle. */
static PyObject *handle_of(FastPath *self, uint64_t fh) {
    PyObject *handles = PyObject_GetAttr(self->fs, S_handles);
    if (handles == NULL) return NULL;
    PyObject *key = PyLong_FromUnsignedLongLong(fh);
    PyObject *hd = key != NULL ? PyDict_GetItemWithError(handles, key) : NULL;
    Py_XDECREF(key);
    Py_XINCREF(hd);
    Py_DECREF(handles);
    return hd;
}

/* ------------------------------------------------------------------ a handle's holders (Handle.users) */
/* An op that uses a handle's fd holds the handle (one more entry in Handle.users) from its lookup in fs._handles
 * to its end, as PassthroughFS._hold does: a RELEASE meanwhile (a hostile guest's, on another queue) takes the
 * handle out of the table at once and gives back the table's hold, and the last holder closes the fd, so its
 * number cannot go to the daemon's next open while the op reads or writes through it.  The lookup and the hold
 * are one step with the GIL held (a RELEASE takes the handle out of the table before it gives its hold back);
 * Handle.users and Handle.unclosed are lists, whose append and pop are atomic under the GIL on both paths. */
static int handle_hold(PyObject *hd) {
    PyObject *users = PyObject_GetAttr(hd, S_users);
    if (users == NULL) return -1;
    int rc = PyList_Check(users) ? PyList_Append(users, Py_None) : -1;
    if (rc < 0 && !PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "Handle.users is not a list");
    Py_DECREF(users);
    return rc;
}

/* Handle.give_back: one holder less; the last one closes the fd (once: whoever takes Handle.unclosed's entry).
 * 0, or -1 with a Python error. */
static int handle_give_back(PyObject *hd) {
    PyObject *users = PyObject_GetAttr(hd, S_users);
    if (users == NULL) return -1;
    Py_ssize_t n = PyList_Check(users) ? PyList_GET_SIZE(users) : 0;
    int rc = n > 0 ? PyList_SetSlice(users, n - 1, n, NULL) : -1;
    int last = rc == 0 && PyList_GET_SIZE(users) == 0;
    Py_DECREF(users);
    if (rc < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "a handle given back more often than held");
        return -1;
    }
    if (!last) return 0;
    PyObject *unclosed = PyObject_GetAttr(hd, S_unclosed);
    if (unclosed == NULL) return -1;
    n = PyList_Check(unclosed) ? PyList_GET_SIZE(unclosed) : 0;
    rc = n > 0 ? PyList_SetSlice(unclosed, 0, n, NULL) : 0;
    Py_DECREF(unclosed);
    if (rc < 0 || n == 0) return rc;
    long long fd;
    if (get_long(hd, S_fd, &fd) < 0) return -1;
    Py_BEGIN_ALLOW_THREADS
    close((int)fd);
    Py_END_ALLOW_THREADS
    return 0;
}

/* The end of an op that held `hd` (its reference goes too): 0, or -1 with a Python error. */
static int handle_end(PyObject *hd) {
    int rc = handle_give_back(hd);
    Py_DECREF(hd);
    return rc;
}

/* The same with the op's result: `result` as it is, or NULL when the give-back failed (an error already set
 * is kept). */
static PyObject *handle_done(PyObject *hd, PyObject *result) {
    PyObject *exc_type, *exc_val, *exc_tb;
    PyErr_Fetch(&exc_type, &exc_val, &exc_tb);
    int rc = handle_give_back(hd);
    Py_DECREF(hd);
    if (exc_type != NULL) {
        if (rc < 0) PyErr_Clear();
        PyErr_Restore(exc_type, exc_val, exc_tb);
        return result;
    }
    if (rc < 0) Py_CLEAR(result);
    return result;
}

/* fs.timeout: the cache mode's entry and attribute timeout. */
static int fs_timeout(FastPath *self, double *out) {
    PyObject *t = PyObject_GetAttr(self->fs, S_timeout);
    if (t == NULL) return -1;
    *out = PyFloat_AsDouble(t);
    Py_DECREF(t);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* store.<method>(inode[, fd]) as a truth value: 1, 0, or -1 with a Python error. */
static int store_call(PyObject *store, PyObject *method, PyObject *inode, int fd) {
    PyObject *r;
    if (fd < 0) {
        r = PyObject_CallMethodOneArg(store, method, inode);
    } else {
        PyObject *fdo = PyLong_FromLong(fd);
        if (fdo == NULL) return -1;
        r = PyObject_CallMethodObjArgs(store, method, inode, fdo, NULL);
        Py_DECREF(fdo);
    }
    if (r == NULL) return -1;
    int t = PyObject_IsTrue(r);
    Py_DECREF(r);
    return t;
}

/* InodeStore.stat: the inode's own O_PATH fd; its cached fd (with the GIL held, marked used; a file with no
 * link left lets it go, store.drop_cached_fd, and asks its handle again); or an fd from its handle, then
 * cached (store.keep_fd) unless it is a file with no link left.  1 and *st; 0 fall back; -1 with errno in
 * *err; -2 a Python error. */
static int inode_stat(PyObject *store, PyObject *inode, struct stat *st, int *err) {
    InodeObject *ino = INODE(inode);
    int fd = ino->fd, cached = ino->cached_fd;
    PathFd p = {inode, -1, 0, 0, 0, NULL};
    if (fd >= 0) {
        int rc = path_fd(store, inode, &p, err);
        if (rc <= 0) return rc;
        *err = do_fstat(&p, st);
        path_fd_done(&p);
        return *err ? -1 : 1;
    }
    if (cached >= 0) {
        if (fstat(cached, st) != 0) { /* an O_PATH fd's fstat does not fail; answered as Python would */
            *err = errno;
            return -1;
        }
        if (st->st_nlink > 0 || S_ISDIR(st->st_mode)) {
            ino->used = 1;
            return 1;
        }
        if (store_call(store, S_drop_cached_fd, inode, -1) < 0) return -2;
    }
    int rc = open_from_handle(store, inode, &p, err);
    if (rc <= 0) return rc;
    *err = do_fstat(&p, st);
    if (*err || (st->st_nlink == 0 && !S_ISDIR(st->st_mode)) || cached >= 0) {
        path_fd_done(&p);
        return *err ? -1 : 1;
    }
    rc = store_call(store, S_keep_fd, inode, p.fd);
    if (rc != 0) p.own = 0; /* kept (keep_fd raises only after taking it: closing an evicted fd) */
    path_fd_done(&p);
    return rc < 0 ? -2 : 1;
}

/* ------------------------------------------------------------------ ops */
static PyObject *getattr_of(FastPath *self, const struct fuse_in_header *h, const struct fuse_getattr_in *gp,
                            PyObject *store, PyObject *inode);

static PyObject *op_getattr(FastPath *self, const struct fuse_in_header *h, const char *body, size_t blen,
                            PyObject *store) {
    if (blen != sizeof(struct fuse_getattr_in)) return fallback(self);
    struct fuse_getattr_in g;
    memcpy(&g, body, sizeof g);
    PyObject *by_id = PyObject_GetAttr(store, S_by_id);
    if (by_id == NULL) return NULL;
    PyObject *inode = inode_of(by_id, h->nodeid);
    Py_DECREF(by_id);
    if (inode == NULL) return PyErr_Occurred() ? NULL : fallback(self); /* Python answers EBADF */
    Py_INCREF(inode); /* a FORGET on another thread may drop it while the GIL is let go */
    PyObject *r = getattr_of(self, h, &g, store, inode);
    Py_DECREF(inode);
    return r;
}

/* op_getattr for a known inode (held by the caller). */
static PyObject *getattr_of(FastPath *self, const struct fuse_in_header *h, const struct fuse_getattr_in *gp,
                            PyObject *store, PyObject *inode) {
    struct fuse_getattr_in g = *gp;
    double timeout;
    if (fs_timeout(self, &timeout) < 0) return NULL;
    struct stat st;
    int e = 0;
    if (g.getattr_flags & self->getattr_fh) {
        PyObject *hd = handle_of(self, g.fh);
        if (hd == NULL && PyErr_Occurred()) return NULL;
        if (hd != NULL) {
            long long fd;
            int rc = handle_hold(hd);
            if (rc == 0 && get_long(hd, S_fd, &fd) < 0) {
                handle_done(hd, NULL);
                return NULL;
            }
            if (rc == 0) {
                Py_BEGIN_ALLOW_THREADS
                rc = fstat((int)fd, &st);
                if (rc != 0) e = errno;
                Py_END_ALLOW_THREADS
                if (handle_end(hd) < 0) return NULL;
                rc = 0;
            } else {
                Py_DECREF(hd);
            }
            if (rc < 0) return NULL;
            if (e) return reply_error(self, h->opcode, h->unique, e);
            goto answer;
        }
    }
    int rc = inode_stat(store, inode, &st, &e);
    if (rc == -2) return NULL;
    if (rc == 0) return fallback(self);
    if (rc < 0) return reply_error(self, h->opcode, h->unique, e);
answer:;
    char *out;
    PyObject *r = reply_new(sizeof(struct fuse_attr_out), h->unique, &out);
    if (r == NULL) return NULL;
    struct fuse_attr_out ao;
    memset(&ao, 0, sizeof ao);
    split_timeout(timeout, &ao.attr_valid, &ao.attr_valid_nsec);
    attr_from_stat(&ao.attr, &st, 0);
    memcpy(out, &ao, sizeof ao);
    self->served[h->opcode]++;
    return r;
}

/* The decoder's NUL-terminated name and check_name()'s rules (not empty, no '/', at most 255 bytes): its
 * length, or 0 for anything else (the Python path answers it). */
static size_t plain_name(const char *body, size_t blen) {
    if (blen < 2 || body[blen - 1] != 0) return 0;
    size_t nlen = blen - 1;
    if (nlen > NAME_MAX_ || memchr(body, 0, nlen) != NULL || memchr(body, '/', nlen) != NULL) return 0;
    return nlen;
}

/* lock.acquire() / lock.release(): 0, or -1 with a Python error. */
static int lock_call(PyObject *lock, PyObject *method) {
    PyObject *r = PyObject_CallMethodNoArgs(lock, method);
    Py_XDECREF(r);
    return r != NULL ? 0 : -1;
}

/* lock.release() with a Python error already set kept across it (over the release's own): 0, or -1 when the
 * release failed. */
static int release_keeping(PyObject *lock) {
    PyObject *exc_type, *exc_val, *exc_tb;
    PyErr_Fetch(&exc_type, &exc_val, &exc_tb);
    int rc = lock_call(lock, S_release);
    if (exc_type != NULL) {
        if (rc < 0) PyErr_Clear();
        PyErr_Restore(exc_type, exc_val, exc_tb);
    }
    return rc;
}

/* Run `call` on the store's lock (InodeStore._lock) with a Python error kept across the release: 0 or -1. */
static int under_lock(PyObject *store, int (*call)(void *), void *arg) {
    PyObject *lock = PyObject_GetAttr(store, S_lock);
    if (lock == NULL) return -1;
    if (lock_call(lock, S_acquire) < 0) {
        Py_DECREF(lock);
        return -1;
    }
    int rc = call(arg);
    if (release_keeping(lock) < 0) rc = -1;
    Py_DECREF(lock);
    return rc;
}

typedef struct {
    PyObject *by_id, *by_key, *key, *inode;
    int current;
} Account;

/* find_known's locked part: one more lookup of the inode, if it is still the one held for its key and id. */
static int account_lookup(void *arg) {
    Account *a = arg;
    a->current = PyDict_GetItemWithError(a->by_key, a->key) == a->inode
                 && inode_of(a->by_id, INODE(a->inode)->nodeid) == a->inode;
    if (PyErr_Occurred()) return -1;
    if (a->current) INODE(a->inode)->nlookup++;
    return 0;
}

static int statx_at(PathFd *p, const char *name, int flags, struct statx *sx) {
    int rc, e = 0;
    if (p != NULL && p->gil) {
        rc = statx(p->fd, name, flags, STATX_BASIC_STATS | STATX_MNT_ID, sx);
        return rc == 0 ? 0 : errno;
    }
    int fd = p != NULL ? p->fd : -1;
    Py_BEGIN_ALLOW_THREADS
    rc = statx(fd, name, flags, STATX_BASIC_STATS | STATX_MNT_ID, sx);
    if (rc != 0) e = errno;
    Py_END_ALLOW_THREADS
    return rc == 0 ? 0 : e;
}

/* 1: the inode held for this key is the one behind `name` (an O_PATH-held one, or one with a cached fd, pins
 * its st_ino; any other handle-held one must match its handle); 0: not known (find_known's None); -1: a
 * Python error. */
static int same_inode(PathFd *p, const char *name, PyObject *inode) {
    InodeObject *ino = INODE(inode);
    if (ino->fd >= 0 || ino->cached_fd >= 0) return 1; /* pinned: cached now, so alive at the statx (find_known) */
    HandleBuf hb;
    int mount_id = 0, rc;
    hb.fh.handle_bytes = MAX_HANDLE_SZ_;
    if (p->gil) {
        rc = name_to_handle_at(p->fd, name, &hb.fh, &mount_id, 0);
    } else {
        Py_BEGIN_ALLOW_THREADS
        rc = name_to_handle_at(p->fd, name, &hb.fh, &mount_id, 0);
        Py_END_ALLOW_THREADS
    }
    if (rc != 0) return 0;
    size_t hlen = sizeof(struct file_handle) + hb.fh.handle_bytes;
    return ino->handle_len == hlen && memcmp(ino->handle.raw, hb.raw, hlen) == 0;
}

/* The OSError being raised becomes an errno to answer (as _serve answers it): 1 and *err set, the error
 * cleared; 0 for any other exception (left set). */
static int take_oserror(int *err) {
    if (!PyErr_ExceptionMatches(PyExc_OSError)) return 0;
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    PyObject *en = v != NULL ? PyObject_GetAttrString(v, "errno") : NULL;
    *err = en != NULL && PyLong_Check(en) ? (int)PyLong_AsLong(en) : EIO;
    if (*err == 0 || PyErr_Occurred()) *err = EIO;
    PyErr_Clear();
    Py_XDECREF(en);
    Py_XDECREF(t);
    Py_XDECREF(v);
    Py_XDECREF(tb);
    return 1;
}

/* store.find_or_add(fd, Statx(...), parent, **kwargs): the inode, one more lookup of it.  A new reference, or
 * NULL with *err set (its OSError's errno) or another Python error.  Who closes fd is find_or_add's rule. */
static PyObject *find_or_add(FastPath *self, PyObject *store, int fd, const struct statx *sx, PyObject *parent,
                             PyObject *kwargs, int *err) {
    unsigned long long mnt_id = (sx->stx_mask & STATX_MNT_ID) ? sx->stx_mnt_id : 0;
    PyObject *st = PyObject_CallFunction(
        self->stat_type, "(KKKKKKKKKKKLLL)", (unsigned long long)sx->stx_mode, (unsigned long long)sx->stx_ino,
        (unsigned long long)makedev(sx->stx_dev_major, sx->stx_dev_minor), mnt_id, (unsigned long long)sx->stx_nlink,
        (unsigned long long)sx->stx_uid, (unsigned long long)sx->stx_gid, (unsigned long long)sx->stx_size,
        (unsigned long long)sx->stx_blocks, (unsigned long long)sx->stx_blksize,
        (unsigned long long)makedev(sx->stx_rdev_major, sx->stx_rdev_minor),
        (long long)sx->stx_atime.tv_sec * 1000000000LL + sx->stx_atime.tv_nsec,
        (long long)sx->stx_mtime.tv_sec * 1000000000LL + sx->stx_mtime.tv_nsec,
        (long long)sx->stx_ctime.tv_sec * 1000000000LL + sx->stx_ctime.tv_nsec);
    PyObject *fdo = st != NULL ? PyLong_FromLong(fd) : NULL;
    if (fdo == NULL) {
        Py_XDECREF(st);
        if (kwargs == NULL) close(fd); /* owned: find_or_add would have closed it */
        return NULL;
    }
    PyObject *inode;
    if (kwargs == NULL) {
        inode = PyObject_CallMethodObjArgs(store, S_find_or_add, fdo, st, parent, NULL);
    } else {
        PyObject *meth = PyObject_GetAttr(store, S_find_or_add);
        PyObject *args = meth != NULL ? PyTuple_Pack(3, fdo, st, parent) : NULL;
        inode = args != NULL ? PyObject_Call(meth, args, kwargs) : NULL;
        Py_XDECREF(args);
        Py_XDECREF(meth);
    }
    Py_DECREF(fdo);
    Py_DECREF(st);
    if (inode == NULL) take_oserror(err);
    return inode;
}

typedef struct {
    Tables t;
    PyObject *store, *key, *parent, *mount, *inode;
    const struct statx *sx;
    int fd, owned, mount_id, kept, python, made;
    long long evicted;
    unsigned int handle_len; /* 0: no handle (handles off) */
    HandleBuf handle;
} Adding;

/* One more lookup of the inode held for a.key, if it is the one behind the fd: pinned (its O_PATH fd, or a
 * cached one), with `by_handle` 1 one whose handle matches a->handle (None with handles off), with 2 any
 * (handles off: nothing to compare) (InodeStore._find_or_add's checks).  a->inode set (a new reference) when
 * it was; 0, or -1 with a Python error. */
static int account_known(Adding *a, int by_handle) {
    PyObject *held = PyDict_GetItemWithError(a->t.by_key, a->key);
    if (held == NULL) return PyErr_Occurred() ? -1 : 0;
    if (!IS_INODE(held)) {
        PyErr_SetString(PyExc_TypeError, "the inode store holds an inode that is not a _fast.Inode");
        return -1;
    }
    InodeObject *ino = INODE(held);
    int same;
    if (ino->fd >= 0 || by_handle == 2) same = 1;
    else if (!by_handle) same = ino->cached_fd >= 0;
    else same = ino->handle_len == a->handle_len && memcmp(ino->handle.raw, a->handle.raw, a->handle_len) == 0;
    if (!same) return 0;
    ino->nlookup++;
    Py_INCREF(held);
    a->inode = held;
    return 0;
}

static int account_pinned(void *arg) {
    return account_known(arg, 0);
}

static int account_any(void *arg) {
    return account_known(arg, 2);
}

/* The O_PATH twin of an fd that stays the caller's (os.open of procfs' self/fd/N, store.proc, with the GIL
 * released as os.open does): the fd, or -1 with its OSError. */
static int path_twin(PyObject *store, int fd) {
    PyObject *proc = PyObject_GetAttr(store, S_proc);
    PyObject *path = proc != NULL ? PyUnicode_FromFormat("%Sself/fd/%d", proc, fd) : NULL;
    PyObject *raw = path != NULL ? PyUnicode_EncodeFSDefault(path) : NULL;
    Py_XDECREF(proc);
    int twin = -1, e = 0;
    if (raw != NULL) {
        Py_BEGIN_ALLOW_THREADS
        twin = open(PyBytes_AS_STRING(raw), O_PATH | O_CLOEXEC);
        if (twin < 0) e = errno;
        Py_END_ALLOW_THREADS
        if (twin < 0) {
            errno = e;
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
        }
    }
    Py_XDECREF(raw);
    Py_XDECREF(path);
    return twin;
}

/* The rest of InodeStore._find_or_add under the lock: the inode if it is known by its handle (a->handle, None
 * with handles off), else a new Inode in both tables, held by its handle on a mount the store has an fd for
 * (an fd the store owns becomes its cached one: _cache_locked's insertion here, its eviction
 * InodeStore._evict_locked's) or, with handles off, by an O_PATH fd (the owned fd, or a twin of the caller's).
 * A mount without an fd yet (the first inode on it) sets a->python: nothing changed, find_or_add does it all. */
static int add_locked(void *arg) {
    Adding *a = arg;
    if (account_known(a, 1) < 0 || a->inode != NULL) return a->inode != NULL ? 0 : -1;
    int keep = -1;
    if (a->handle_len) {
        PyObject *mid = PyLong_FromLong(a->mount_id);
        if (mid == NULL) return -1;
        a->mount = PyDict_GetItemWithError(a->t.mounts, mid);
        Py_DECREF(mid);
        if (a->mount == NULL) {
            a->python = !PyErr_Occurred();
            return a->python ? 0 : -1;
        }
    } else {
        keep = a->owned ? a->fd : path_twin(a->store, a->fd);
        if (keep < 0) return -1; /* a->mount still NULL: store_add releases no reference it never took */
        a->mount = Py_None;
    }
    Py_INCREF(a->mount);
    long long generation, next, refs, max;
    if (get_long(a->store, S_generation_, &generation) < 0 || set_long(a->store, S_generation_, generation + 1) < 0
        || get_long(a->store, S_next_id, &next) < 0)
        return -1;
    a->inode = inode_make((unsigned long long)next, (unsigned long long)generation + 1, a->sx, keep, a->handle.raw,
                          a->handle_len, a->mount, INODE(a->parent)->mnt_id);
    if (a->inode == NULL
        || (a->mount != Py_None && (get_long(a->mount, S_refs, &refs) < 0 || set_long(a->mount, S_refs, refs + 1) < 0))
        || set_long(a->store, S_next_id, next + 1) < 0)
        return -1;
    a->made = 1;
    PyObject *nodeid = PyLong_FromLongLong(next);
    int rc = 0;
    if (nodeid == NULL || PyDict_SetItem(a->t.by_id, nodeid, a->inode) < 0
        || PyDict_SetItem(a->t.by_key, a->key, a->inode) < 0)
        rc = -1;
    if (rc == 0 && keep >= 0) a->kept = keep == a->fd; /* an owned fd the new inode holds */
    if (rc == 0 && a->owned && keep < 0) { /* handle-held: _cache_locked(new, fd) */
        a->kept = 1;
        INODE(a->inode)->cached_fd = a->fd;
        INODE(a->inode)->used = 0;
        if (PyObject_SetItem(a->t.cached, nodeid, a->inode) < 0 || get_long(a->store, S_fd_cache_max, &max) < 0) {
            rc = -1;
        } else if (PyObject_Length(a->t.cached) > max) {
            PyObject *ev = PyObject_CallMethodNoArgs(a->store, S_evict_locked);
            if (ev == NULL || (a->evicted = PyLong_AsLongLong(ev)) == -1) rc = PyErr_Occurred() ? -1 : 0;
            Py_XDECREF(ev);
        }
    }
    Py_XDECREF(nodeid);
    return rc;
}

/* InodeStore.find_or_add, with the store's tables changed here under its lock (one more lookup of a known
 * inode; a new Inode held by its handle on a mount it has an fd for, or with handles off by an O_PATH fd);
 * anything else (no handle for this inode, a mount without an fd yet) is find_or_add's, called before anything
 * was changed.  `owned`:
 * the fd is the store's to keep (as the new inode's cached fd) or close, else the caller's (CREATE's open
 * file).  A new reference, or NULL with *err set (an errno to answer) or a Python error. */
static PyObject *store_add(FastPath *self, PyObject *store, int fd, const struct statx *sx, PyObject *parent,
                           int owned, int *err, int *made) {
    Adding a;
    memset(&a, 0, sizeof a);
    a.store = store;
    a.parent = parent;
    a.sx = sx;
    a.fd = fd;
    a.owned = owned;
    a.evicted = -1;
    PyObject *mode = PyObject_GetAttr(store, S_mode);
    int never = mode != NULL ? PyUnicode_Check(mode) && PyUnicode_CompareWithASCIIString(mode, "never") == 0 : -1;
    Py_XDECREF(mode);
    if (never < 0 || tables_of(store, &a.t) < 0) goto error;
    a.key = Py_BuildValue("(KKK)", (unsigned long long)makedev(sx->stx_dev_major, sx->stx_dev_minor),
                          (unsigned long long)sx->stx_ino,
                          (unsigned long long)((sx->stx_mask & STATX_MNT_ID) ? sx->stx_mnt_id : 0));
    if (a.key == NULL) goto error;
    /* Not held now: as if the lock had been taken before whoever adds it next (add_locked looks again). */
    PyObject *held = PyDict_GetItemWithError(a.t.by_key, a.key);
    if (held == NULL && PyErr_Occurred()) goto error;
    if (held != NULL && under_lock(store, never ? account_any : account_pinned, &a) < 0) goto error;
    if (a.inode == NULL && never) {
        if (under_lock(store, add_locked, &a) < 0) goto error;
    } else if (a.inode == NULL) {
        int rc;
        a.handle.fh.handle_bytes = MAX_HANDLE_SZ_;
        Py_BEGIN_ALLOW_THREADS
        rc = name_to_handle_at(fd, "", &a.handle.fh, &a.mount_id, AT_EMPTY_PATH);
        Py_END_ALLOW_THREADS
        if (rc != 0) goto python; /* counted, logged or refused there */
        a.handle_len = (unsigned int)(sizeof(struct file_handle) + a.handle.fh.handle_bytes);
        if (under_lock(store, add_locked, &a) < 0) goto error;
        if (a.python) goto python;
    }
    if (owned && !a.kept) close(fd);
    if (a.evicted >= 0) close((int)a.evicted);
    if (made != NULL) *made = a.made;
    goto out;
python:
    Py_CLEAR(a.inode);
    a.inode = find_or_add(self, store, fd, sx, parent, owned ? NULL : self->not_owned, err);
    if (a.inode != NULL && !IS_INODE(a.inode)) {
        Py_CLEAR(a.inode);
        PyErr_SetString(PyExc_TypeError, "InodeStore.find_or_add made an inode that is not a _fast.Inode");
    }
    goto out;
error:
    Py_CLEAR(a.inode);
    if (owned && !a.kept) close(fd); /* find_or_add's rule: an owned fd it did not keep is closed */
    take_oserror(err);
out:
    Py_XDECREF(a.key);
    Py_XDECREF(a.mount);
    tables_done(&a.t);
    return a.inode;
}

/* An O_PATH fd on `name` under the parent (with the GIL held for a cached directory fd): the fd, or -1 and *err. */
static int open_path(PathFd *p, const char *name, int *err) {
    int fd, e = 0;
    if (p->gil) {
        fd = openat(p->fd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) e = errno;
    } else {
        Py_BEGIN_ALLOW_THREADS
        fd = openat(p->fd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) e = errno;
        Py_END_ALLOW_THREADS
    }
    *err = e;
    return fd;
}

/* The inode behind an O_PATH fd of the store's own, as fs._do_lookup finds a new one: the fd's statx (into sx)
 * and the store's find_or_add (store_add: the inode known by its key and handle gets one more lookup, *made 0;
 * else a new one, *made 1; it keeps or closes the fd).  A new reference, or NULL with *err set (an errno to
 * answer) or a Python error. */
static PyObject *adopt_fd(FastPath *self, PyObject *store, int fd, PyObject *parent, struct statx *sx, int *err,
                          int *made) {
    PathFd own = {NULL, fd, 0, 0, 0, NULL};
    int e = statx_at(&own, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, sx);
    if (e) {
        close(fd);
        *err = e;
        return NULL;
    }
    return store_add(self, store, fd, sx, parent, 1, err, made);
}

/* A new inode, as fs._do_lookup makes one after find_known found none: an O_PATH fd on the name (the parent's
 * fd is done with after it), then adopt_fd. */
static PyObject *adopt(FastPath *self, PyObject *store, PathFd *p, const char *name, PyObject *parent,
                       struct statx *sx, int *err, int *made) {
    int e, fd = open_path(p, name, &e);
    path_fd_done(p);
    if (fd < 0) {
        *err = e;
        return NULL;
    }
    return adopt_fd(self, store, fd, parent, sx, err, made);
}

/* fs._entry: the entry of `inode` found under `parent`, FUSE_ATTR_SUBMOUNT on a directory on another mount
 * or st_dev than its parent (generation 0 there where the filesystem says so).  0, or -1 with a Python error. */
static int entry_out(FastPath *self, PyObject *inode, PyObject *parent, const struct statx *sx,
                     struct fuse_entry_out *eo) {
    InodeObject *i = INODE(inode), *p = INODE(parent);
    unsigned long long generation = i->generation;
    PyObject *sub = PyObject_GetAttr(self->fs, S_submounts);
    if (sub == NULL) return -1;
    int submounts = PyObject_IsTrue(sub);
    Py_DECREF(sub);
    double timeout;
    if (submounts < 0 || fs_timeout(self, &timeout) < 0) return -1;
    uint32_t flags = 0;
    if (submounts && S_ISDIR(sx->stx_mode) && (i->mnt_id != p->mnt_id || i->dev != p->dev)) {
        flags = self->attr_submount;
        PyObject *zero = PyObject_GetAttr(self->fs, S_zero_gen);
        int z = zero != NULL ? PyObject_IsTrue(zero) : -1;
        Py_XDECREF(zero);
        if (z < 0) return -1;
        if (z) generation = 0;
    }
    memset(eo, 0, sizeof *eo);
    eo->nodeid = i->nodeid;
    eo->generation = generation;
    split_timeout(timeout, &eo->entry_valid, &eo->entry_valid_nsec);
    split_timeout(timeout, &eo->attr_valid, &eo->attr_valid_nsec);
    attr_from_statx(&eo->attr, sx, flags);
    return 0;
}

/* The parent directory's fd for a name op (path_fd): 1 ready; 0 answered in *result (the Python path's
 * for a directory whose fd is not cached yet or a file as the parent, or the errno of opening it), or with
 * *result NULL and a Python error. */
static int parent_fd(FastPath *self, PyObject *store, const struct fuse_in_header *h, PyObject *parent, PathFd *p,
                     PyObject **result) {
    int e = 0, rc = path_fd(store, parent, p, &e);
    *result = NULL;
    if (rc == -2) return 0;
    if (rc == 0 || (rc > 0 && !S_ISDIR(p->mode))) {
        path_fd_done(p);
        *result = fallback(self);
        return 0;
    }
    if (rc < 0) {
        *result = reply_error(self, h->opcode, h->unique, e);
        return 0;
    }
    return 1;
}

/* LOOKUP (fs.lookup: check_name, fs._do_lookup with InodeStore.find_known / find_or_add, fs._entry). */
static PyObject *op_lookup(FastPath *self, const struct fuse_in_header *h, const char *body, size_t blen,
                           PyObject *store) {
    size_t nlen = plain_name(body, blen);
    if (nlen == 0) return fallback(self);
    const char *name = body;
    int dotdot = nlen == 2 && name[0] == '.' && name[1] == '.';
    if ((nlen == 1 && name[0] == '.') || (dotdot && h->nodeid == FUSE_ROOT_ID)) {
        name = ".";
        dotdot = 0;
    }
    Account a = {NULL, NULL, NULL, NULL, 0};
    PyObject *result = NULL, *parent = NULL;
    a.by_id = PyObject_GetAttr(store, S_by_id);
    if (a.by_id == NULL) return NULL;
    parent = inode_of(a.by_id, h->nodeid);
    if (parent == NULL) {
        result = PyErr_Occurred() ? NULL : fallback(self); /* EBADF: Python's */
        goto out;
    }
    Py_INCREF(parent);
    PathFd p;
    int e, rc, made = 0;
    if (!parent_fd(self, store, h, parent, &p, &result)) goto out;
    struct statx sx;
    if (!dotdot && !(name[0] == '.' && name[1] == 0) && INODE(parent)->new_run >= NEW_RUN) {
        /* The last LOOKUPs here found new inodes (a cold stat of a tree): the name opened first, as a new inode
         * needs, and its statx from that fd, with no statx by name before (the C virtiofsd's two calls).  A
         * known inode found so costs an open and a close more than by name: the run starts again from 0. */
        int fd = open_path(&p, name, &e);
        if (fd >= 0 || e == ENOENT) {
            path_fd_done(&p);
            if (fd < 0) {
                result = reply_error(self, h->opcode, h->unique, e);
                goto out;
            }
            e = 0;
            a.inode = adopt_fd(self, store, fd, parent, &sx, &e, &made);
            if (a.inode == NULL) {
                if (e) result = reply_error(self, h->opcode, h->unique, e);
                goto out;
            }
            goto answer;
        }
        /* any other error: asked by name, as below, which answers it */
    }
    e = statx_at(&p, name, AT_SYMLINK_NOFOLLOW, &sx);
    if (e) {
        path_fd_done(&p);
        result = reply_error(self, h->opcode, h->unique, e);
        goto out;
    }
    unsigned long long mnt_id = (sx.stx_mask & STATX_MNT_ID) ? sx.stx_mnt_id : 0;
    a.key = Py_BuildValue("(KKK)", (unsigned long long)makedev(sx.stx_dev_major, sx.stx_dev_minor),
                          (unsigned long long)sx.stx_ino, mnt_id);
    a.by_key = a.key != NULL ? PyObject_GetAttr(store, S_by_key) : NULL;
    if (a.by_key == NULL) {
        path_fd_done(&p);
        goto out;
    }
    a.inode = PyDict_GetItemWithError(a.by_key, a.key);
    if (a.inode == NULL && PyErr_Occurred()) {
        path_fd_done(&p);
        goto out;
    }
    if (a.inode != NULL && !IS_INODE(a.inode)) { /* not one of ours: Python's (nothing changed) */
        a.inode = NULL;
        path_fd_done(&p);
        result = fallback(self);
        goto out;
    }
    Py_XINCREF(a.inode);
    if (a.inode != NULL) {
        rc = same_inode(&p, name, a.inode);
        if (rc < 0 || (rc == 1 && under_lock(store, account_lookup, &a) < 0)) {
            path_fd_done(&p);
            goto out;
        }
        if (rc == 1 && !a.current && p.gil) {
            /* Replaced meanwhile, and waiting for the lock may have let the GIL go: the cached directory
             * fd may be gone too.  Nothing was changed: Python serves it. */
            path_fd_done(&p);
            result = fallback(self);
            goto out;
        }
    }
    if (!a.current) { /* find_known found nothing: a new inode (or the key's old one gone) */
        Py_CLEAR(a.inode);
        if (dotdot) { /* only an inode the client already reached from the root */
            path_fd_done(&p);
            result = reply_error(self, h->opcode, h->unique, EACCES);
            goto out;
        }
        e = 0;
        a.inode = adopt(self, store, &p, name, parent, &sx, &e, &made);
        if (a.inode == NULL) {
            if (e) result = reply_error(self, h->opcode, h->unique, e);
            goto out;
        }
    } else {
        path_fd_done(&p);
    }
answer:
    INODE(parent)->new_run = !made ? 0 : INODE(parent)->new_run < NEW_RUN ? INODE(parent)->new_run + 1 : NEW_RUN;
    struct fuse_entry_out eo;
    if (entry_out(self, a.inode, parent, &sx, &eo) < 0) goto out;
    char *out;
    result = reply_new(sizeof eo, h->unique, &out);
    if (result == NULL) goto out;
    memcpy(out, &eo, sizeof eo);
    self->served[h->opcode]++;
out:
    Py_XDECREF(a.inode);
    Py_XDECREF(a.key);
    Py_XDECREF(a.by_key);
    Py_XDECREF(parent);
    Py_DECREF(a.by_id);
    return result;
}

/* UNLINK / RMDIR (fs.unlink / fs.rmdir): one unlinkat() under the parent, on a writable export. */
static PyObject *op_unlink(FastPath *self, const struct fuse_in_header *h, const char *body, size_t blen,
                           PyObject *store, int flags) {
    size_t nlen = plain_name(body, blen);
    if (nlen == 0 || (nlen == 1 && body[0] == '.') || (nlen == 2 && body[0] == '.' && body[1] == '.'))
        return fallback(self);
    int readonly = opt_true(self, S_readonly);
    if (readonly < 0) return NULL;
    if (readonly) return fallback(self); /* EROFS is Python's to answer */
    PyObject *parent = inode_ref(store, h->nodeid);
    if (parent == NULL) return PyErr_Occurred() ? NULL : fallback(self);
    PathFd p;
    PyObject *answered;
    int e = 0, rc, ready = parent_fd(self, store, h, parent, &p, &answered);
    Py_DECREF(parent);
    if (!ready) return answered;
    if (p.gil) {
        rc = unlinkat(p.fd, body, flags);
        if (rc != 0) e = errno;
    } else {
        Py_BEGIN_ALLOW_THREADS
        rc = unlinkat(p.fd, body, flags);
        if (rc != 0) e = errno;
        Py_END_ALLOW_THREADS
    }
    path_fd_done(&p);
    if (rc != 0) return reply_error(self, h->opcode, h->unique, e);
    char *out;
    PyObject *r = reply_new(0, h->unique, &out);
    if (r != NULL) self->served[h->opcode]++;
    return r;
}

/* ------------------------------------------------------------------ open files */
/* fs._open_flags for a writable export (a read-only one's EROFS is Python's): 1 and *out, 0 Python's, -1 error. */
static int open_flags(FastPath *self, unsigned int flags, unsigned int *out) {
    unsigned int acc = flags & O_ACCMODE;
    int readonly = opt_true(self, S_readonly);
    if (readonly < 0) return -1;
    if (readonly && (acc != O_RDONLY || (flags & O_TRUNC))) return 0;
    flags &= ~(unsigned int)(O_DIRECT | O_NOCTTY);
    int writeback = fs_true(self, S_writeback);
    if (writeback < 0) return -1;
    if (writeback) { /* the kernel's page cache may read-modify-write and handles O_APPEND itself */
        if (acc == O_WRONLY) flags = (flags & ~(unsigned int)O_ACCMODE) | O_RDWR;
        flags &= ~(unsigned int)O_APPEND;
    }
    *out = flags;
    return 1;
}

/* fs._add_file's plain case: FUSE passthrough (a backing file to register) is Python's.  1 plain, 0 not, -1. */
static int plain_files(FastPath *self) {
    int pt = fs_true(self, S_passthrough);
    if (pt <= 0) return pt < 0 ? -1 : 1;
    PyObject *backing = PyObject_GetAttr(self->fs, S_backing);
    if (backing == NULL) return -1;
    int none = backing == Py_None;
    Py_DECREF(backing);
    return none;
}

typedef struct {
    FastPath *self;
    int fd, is_dir;
    PyObject *inode, *fh;
} NewHandle;

/* fs._add_handle's locked part: the next fh, and Handle(fd, inode, is_dir, -1) in fs._handles under it. */
static int add_handle_locked(void *arg) {
    NewHandle *n = arg;
    long long next;
    if (get_long(n->self->fs, S_next_fh, &next) < 0) return -1;
    PyObject *after = PyLong_FromLongLong(next + 1);
    if (after == NULL) return -1;
    int rc = PyObject_SetAttr(n->self->fs, S_next_fh, after);
    Py_DECREF(after);
    if (rc < 0) return -1;
    n->fh = PyLong_FromLongLong(next);
    if (n->fh == NULL) return -1;
    PyObject *hd = PyObject_CallFunction(n->self->handle_type, "iOOi", n->fd, n->inode, n->is_dir ? Py_True : Py_False,
                                         -1);
    PyObject *handles = hd != NULL ? PyObject_GetAttr(n->self->fs, S_handles) : NULL;
    rc = handles != NULL ? PyObject_SetItem(handles, n->fh, hd) : -1;
    Py_XDECREF(handles);
    Py_XDECREF(hd);
    return rc;
}

/* The reply to OPEN / OPENDIR / CREATE for a new handle on `fd`: [entry] + fuse_open_out with the cache mode's
 * FOPEN flags (fs._fopen_file / fs._fopen_dir).  The fd is the handle's from here on; NULL: a Python error (fd
 * closed if no handle holds it). */
static PyObject *open_reply(FastPath *self, const struct fuse_in_header *h, int fd, PyObject *inode, int is_dir,
                            const struct fuse_entry_out *eo) {
    long long fopen;
    if (get_long(self->fs, is_dir ? S_fopen_dir : S_fopen_file, &fopen) < 0) {
        close(fd);
        return NULL;
    }
    NewHandle n = {self, fd, is_dir, inode, NULL};
    if (under_lock(self->fs, add_handle_locked, &n) < 0) {
        if (n.fh == NULL) close(fd);
        Py_XDECREF(n.fh);
        return NULL;
    }
    struct fuse_open_out oo;
    memset(&oo, 0, sizeof oo);
    oo.fh = PyLong_AsUnsignedLongLong(n.fh);
    oo.open_flags = (uint32_t)fopen;
    Py_DECREF(n.fh);
    if (PyErr_Occurred()) return NULL;
    size_t head = eo != NULL ? sizeof *eo : 0;
    char *out;
    PyObject *r = reply_new(head + sizeof oo, h->unique, &out);
    if (r == NULL) return NULL;
    if (eo != NULL) memcpy(out, eo, sizeof *eo);
    memcpy(out + head, &oo, sizeof oo);
    self->served[h->opcode]++;
    return r;
}

/* A Python error after the host was changed (a file created): answered EIO, as _serve answers an op that
 * raised, with the error reported (sys.unraisablehook) rather than handed back to be served a second time. */
static PyObject *created_but_failed(FastPath *self, const struct fuse_in_header *h) {
    PyErr_WriteUnraisable(self->fs);
    return reply_error(self, h->opcode, h->unique, EIO);
}

/* fs._creating's thread: 1 on a thread with its own umask 0 (fs._prepare_thread, asked once per thread), 0 on
 * one without (the main thread: Python's to serve, it switches the process's umask), -1 a Python error. */
static int thread_can_create(FastPath *self) {
    if (thread_ready == 0) {
        int privileged = fs_true(self, S_switch_creds);
        if (privileged < 0) return -1;
        PyObject *r = PyObject_CallFunctionObjArgs(self->prepare_thread, privileged ? Py_True : Py_False, NULL);
        int ok = r != NULL ? PyObject_IsTrue(r) : -1;
        Py_XDECREF(r);
        if (ok < 0) return -1;
        thread_ready = ok ? 1 : -1;
    }
    return thread_ready > 0;
}

/* fs._creds: 1 act as the caller (this thread's fsuid/fsgid, no supplementary groups: the request carries
 * none, or it has extensions and is Python's), 0 as we are, 2 Python's (groups read from /proc), -1 error. */
static int caller_creds(FastPath *self, const struct fuse_in_header *h) {
    int sw = fs_true(self, S_switch_creds);
    if (sw <= 0 || (h->uid == 0 && h->gid == 0)) return sw < 0 ? -1 : 0;
    int kernel = fs_true(self, S_kernel_groups);
    if (kernel < 0) return -1;
    if (kernel) return 1;
    int proc = opt_true(self, S_proc_groups);
    return proc < 0 ? -1 : proc ? 2 : 1;
}

/* openat() as the caller when `creds` (fs._switched: this thread's fsgid and fsuid, back to 0 after); no
 * Python API: it runs with the GIL held or released. */
static int open_as(const struct fuse_in_header *h, int creds, int dirfd, const char *name, int flags, mode_t mode,
                   int *err) {
    if (creds) {
        setfsgid(h->gid);
        setfsuid(h->uid);
    }
    int fd = openat(dirfd, name, flags, mode);
    if (fd < 0) *err = errno;
    if (creds) {
        setfsuid(0);
        setfsgid(0);
    }
    return fd;
}

/* CREATE (fs.create): the caller's open(O_CREAT) under the parent, its statx, the store's own find_or_add and
 * a new handle.  Left to Python: a read-only export, FUSE passthrough, KILL_SUIDGID with O_TRUNC (CAP_FSETID
 * lowered), the flags above, a bad name, an unknown parent or one whose fd is not at hand, the main thread,
 * callers whose groups come from /proc. */
static PyObject *op_create(FastPath *self, const struct fuse_in_header *h, const char *body, size_t blen,
                           PyObject *store) {
    struct fuse_create_in c;
    if (blen < sizeof c) return fallback(self);
    memcpy(&c, body, sizeof c);
    const char *name = body + sizeof c;
    size_t nlen = plain_name(name, blen - sizeof c);
    if (nlen == 0 || (nlen == 1 && name[0] == '.') || (nlen == 2 && name[0] == '.' && name[1] == '.')
        || (c.flags & OPEN_LEFT_TO_PYTHON) || ((c.open_flags & self->open_kill_suidgid) && (c.flags & O_TRUNC)))
        return fallback(self);
    unsigned int flags;
    int readonly = opt_true(self, S_readonly), rc;
    if (readonly < 0) return NULL;
    if (readonly || (rc = open_flags(self, c.flags, &flags)) == 0) return fallback(self);
    if (rc < 0) return NULL;
    int plain = plain_files(self), ready = plain > 0 ? thread_can_create(self) : plain;
    int creds = ready > 0 ? caller_creds(self, h) : ready;
    if (creds < 0) return NULL;
    if (!ready || creds == 2) return fallback(self);
    PyObject *parent = inode_ref(store, h->nodeid);
    if (parent == NULL) return PyErr_Occurred() ? NULL : fallback(self); /* EBADF: Python's */
    PyObject *result = NULL, *inode = NULL;
    PathFd p;
    int e = 0, fd;
    if (!parent_fd(self, store, h, parent, &p, &result)) goto out;
    /* O_NONBLOCK: an existing FIFO or device under that name must not block or be opened for real. */
    int oflags = (int)(flags | O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    mode_t mode = c.mode & 07777;
    if (p.gil) {
        fd = open_as(h, creds, p.fd, name, oflags, mode, &e);
    } else {
        Py_BEGIN_ALLOW_THREADS
        fd = open_as(h, creds, p.fd, name, oflags, mode, &e);
        Py_END_ALLOW_THREADS
    }
    path_fd_done(&p);
    if (fd < 0) {
        result = reply_error(self, h->opcode, h->unique, e);
        goto out;
    }
    /* identity from the open file itself: no second walk of the name */
    struct statx sx;
    PathFd own = {NULL, fd, 0, 0, 0, NULL};
    e = statx_at(&own, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, &sx);
    if (!e && !S_ISREG(sx.stx_mode)) e = EPERM; /* not a regular file */
    if (!e && !(flags & O_NONBLOCK) && fcntl(fd, F_SETFL, (int)flags) != 0) e = errno;
    if (e) {
        close(fd);
        result = reply_error(self, h->opcode, h->unique, e);
        goto out;
    }
    inode = store_add(self, store, fd, &sx, parent, 0, &e, NULL);
    if (inode == NULL) {
        close(fd);
        if (e) result = reply_error(self, h->opcode, h->unique, e);
        else result = created_but_failed(self, h);
        goto out;
    }
    struct fuse_entry_out eo;
    if (entry_out(self, inode, parent, &sx, &eo) < 0) {
        close(fd);
        result = created_but_failed(self, h);
        goto out;
    }
    result = open_reply(self, h, fd, inode, 0, &eo);
    if (result == NULL) result = created_but_failed(self, h);
out:
    Py_XDECREF(inode);
    Py_DECREF(parent);
    return result;
}

/* OPEN / OPENDIR (fs.open / fs.opendir): InodeStore.reopen of the inode (its O_PATH fd through procfs, or its
 * handle) and a new handle.  Left to Python: the errors fs.open, fs.opendir and reopen raise themselves
 * (EISDIR, ENOTDIR, ELOOP, EPERM, EINVAL, EBADF, EROFS), the flags above, KILL_SUIDGID with O_TRUNC, FUSE
 * passthrough. */
static PyObject *op_open(FastPath *self, const struct fuse_in_header *h, const char *body, size_t blen,
                         PyObject *store, int is_dir) {
    struct fuse_open_in o;
    if (blen != sizeof o) return fallback(self);
    memcpy(&o, body, sizeof o);
    unsigned int flags = O_RDONLY | O_DIRECTORY;
    int rc;
    if (!is_dir) {
        if ((o.flags & OPEN_LEFT_TO_PYTHON) || ((o.open_flags & self->open_kill_suidgid) && (o.flags & O_TRUNC)))
            return fallback(self);
        if ((rc = open_flags(self, o.flags, &flags)) <= 0 || (rc = plain_files(self)) <= 0)
            return rc < 0 ? NULL : fallback(self);
    }
    flags &= ~(unsigned int)(O_CREAT | O_EXCL | O_NOFOLLOW | O_NOCTTY);
    PyObject *inode = inode_ref(store, h->nodeid);
    if (inode == NULL) return PyErr_Occurred() ? NULL : fallback(self);
    PyObject *result = NULL, *proc = NULL;
    InodeObject *ino = INODE(inode);
    long long mfd = -1;
    int lent = 0;
    if (is_dir ? !S_ISDIR(ino->mode) : !S_ISREG(ino->mode)) {
        result = fallback(self);
        goto out;
    }
    if (ino->nodeid != FUSE_ROOT_ID) { /* its fd, or its mount's, stays open while it is used */
        if ((lent = lend(store, inode)) <= 0) {
            result = lent < 0 ? NULL : fallback(self);
            goto out;
        }
    }
    int ifd = ino->fd;
    char path[64];
    struct file_handle *fh = NULL;
    HandleBuf hb;
    if (ifd >= 0) {
        proc = PyObject_GetAttr(store, S_proc);
        const char *pre = proc != NULL ? PyUnicode_AsUTF8(proc) : NULL;
        if (pre == NULL) goto out;
        if ((size_t)snprintf(path, sizeof path, "%sself/fd/%d", pre, ifd) >= sizeof path) {
            result = fallback(self);
            goto out;
        }
    } else {
        if (!ino->handle_len || ino->mount == Py_None) {
            result = fallback(self);
            goto out;
        }
        if (get_long(ino->mount, S_fd, &mfd) < 0) goto out;
        memcpy(hb.raw, ino->handle.raw, ino->handle_len);
        fh = &hb.fh;
    }
    int fd, e = 0, again = 0;
    Py_BEGIN_ALLOW_THREADS
    fd = fh == NULL ? open(path, (int)flags | O_CLOEXEC) : open_by_handle_at((int)mfd, fh, (int)flags | O_CLOEXEC);
    if (fd < 0) e = errno;
    Py_END_ALLOW_THREADS
    if (fd >= 0 && fh != NULL && unpinned(store, inode, fd, &again) < 0) {
        close(fd);
        goto out;
    }
    if (again) { /* a file deleted on the host, kept alive by its cached fd only: as without the cache */
        close(fd);
        Py_BEGIN_ALLOW_THREADS
        fd = open_by_handle_at((int)mfd, fh, (int)flags | O_CLOEXEC);
        if (fd < 0) e = errno;
        Py_END_ALLOW_THREADS
    }
    if (lent > 0) {
        lent = 0;
        if (give_back(store, inode) < 0) {
            if (fd >= 0) close(fd);
            goto out;
        }
    }
    if (fd < 0) result = reply_error(self, h->opcode, h->unique, e);
    else result = open_reply(self, h, fd, inode, is_dir, NULL);
out:
    if (lent > 0) {
        if (result == NULL) give_back_keeping(store, inode);
        else if (give_back(store, inode) < 0) Py_CLEAR(result);
    }
    Py_XDECREF(proc);
    Py_DECREF(inode);
    return result;
}

/* ------------------------------------------------------------------ I/O */
#define MAX_IOV 256

/* The fd of fs._handles[fh] when it is a file's (fs._using(fh)): 1, *fd and *held (the handle, held until
 * handle_done), 0 not (EBADF: Python's), -1. */
static int file_fd(FastPath *self, uint64_t fh, int *fd, PyObject **held) {
    PyObject *hd = handle_of(self, fh);
    if (hd == NULL) return PyErr_Occurred() ? -1 : 0;
    long long v;
    int is_dir = truth_of(hd, S_is_dir), rc = is_dir < 0 ? -1 : 0;
    if (rc < 0 || is_dir) {
        Py_DECREF(hd);
        return rc;
    }
    if (handle_hold(hd) < 0) { /* held before its fd is read: the number stays the handle's until given back */
        Py_DECREF(hd);
        return -1;
    }
    if (get_long(hd, S_fd, &v) < 0) {
        handle_done(hd, NULL);
        return -1;
    }
    *fd = (int)v;
    *held = hd;
    return 1;
}

/* fs.chain_for(unique): the descriptor chain a vhost-user READ came in (GuestPassthroughFS.read fills its
 * writable buffers in place), or None: no such filesystem, no chain, or a tap that needs the bytes.  `given`:
 * the chain the transport handed over with the request (the one chain_for would name), or NULL. */
static PyObject *chain_of(FastPath *self, uint64_t unique, PyObject *given) {
    PyObject *lookup = PyObject_GetAttr(self->fs, S_chain_for);
    if (lookup == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return NULL;
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    if (lookup == Py_None) return lookup;
    if (given != NULL && given != Py_None) {
        Py_DECREF(lookup);
        Py_INCREF(given);
        return given;
    }
    PyObject *key = PyLong_FromUnsignedLongLong(unique);
    PyObject *chain = key != NULL ? PyObject_CallOneArg(lookup, key) : NULL;
    Py_XDECREF(key);
    Py_DECREF(lookup);
    return chain;
}

typedef struct {
    struct iovec iov[MAX_IOV];
    Py_buffer views[MAX_IOV];
    int n, nviews;
} GuestIov;

static void guest_iov_done(GuestIov *g) {
    for (int i = 0; i < g->nviews; i++) PyBuffer_Release(&g->views[i]);
    g->n = g->nviews = 0;
}

/* The same from the ring engine's iovec of the chain's writable buffers (the C entry, ring_answer.h: the
 * engine keeps them mapped).  0, or 1 when there are more than MAX_IOV of them (Python's). */
static int guest_iov_of(const struct iovec *wr, int nwr, size_t skip, size_t size, GuestIov *g) {
    g->n = g->nviews = 0;
    for (int i = 0; i < nwr && size > 0; i++) {
        size_t len = wr[i].iov_len;
        if (skip >= len) {
            skip -= len;
            continue;
        }
        if (g->n == MAX_IOV) return 1;
        size_t k = len - skip < size ? len - skip : size;
        g->iov[g->n].iov_base = (char *)wr[i].iov_base + skip;
        g->iov[g->n++].iov_len = k;
        skip = 0;
        size -= k;
    }
    return 0;
}

/* vhost_user.data_views: the chain's writable buffers after the reply header, `size` bytes at most.  0, 1 when
 * there are more than MAX_IOV of them (Python's), -1 a Python error. */
static int guest_iov(PyObject *chain, size_t skip, size_t size, GuestIov *g) {
    g->n = g->nviews = 0;
    PyObject *segs = PyObject_GetAttr(chain, S_writable);
    PyObject *seq = segs != NULL ? PySequence_Fast(segs, "writable segments") : NULL;
    Py_XDECREF(segs);
    if (seq == NULL) return -1;
    int rc = 0;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq) && size > 0; i++) {
        Py_buffer v;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, i), &v, PyBUF_WRITABLE) < 0) {
            rc = -1;
            break;
        }
        size_t len = (size_t)v.len;
        if (skip >= len) {
            skip -= len;
            PyBuffer_Release(&v);
            continue;
        }
        if (g->n == MAX_IOV) {
            PyBuffer_Release(&v);
            rc = 1;
            break;
        }
        size_t k = len - skip < size ? len - skip : size;
        g->iov[g->n].iov_base = (char *)v.buf + skip;
        g->iov[g->n].iov_len = k;
        g->views[g->n++] = v;
        g->nviews = g->n;
        skip = 0;
        size -= k;
    }
    Py_DECREF(seq);
    if (rc) guest_iov_done(g);
    return rc;
}

/* READ (fs.read, or GuestPassthroughFS.read: preadv straight into the chain's guest buffers, the reply then
 * its header and the length already in place).  Left to Python: a READ bigger than the engine serves inline,
 * a handle that is not a file's (EBADF).  From the ring engine's C entry (`wr` not NULL) the chain's buffers
 * are `wr`, and the length in place goes to *in_place instead of an fs.in_place object. */
static PyObject *read_fd(FastPath *self, const struct fuse_in_header *h, struct fuse_read_in r, int fd,
                         PyObject *given, const struct iovec *wr, int nwr, size_t *in_place);

static PyObject *op_read(FastPath *self, const struct fuse_in_header *h, const char *body, size_t blen,
                         PyObject *given, const struct iovec *wr, int nwr, size_t *in_place) {
    struct fuse_read_in r;
    if (blen != sizeof r) return fallback(self);
    memcpy(&r, body, sizeof r);
    if (r.size > self->inline_io_max) return fallback(self);
    PyObject *hd;
    int fd, rc = file_fd(self, r.fh, &fd, &hd);
    if (rc <= 0) return rc < 0 ? NULL : fallback(self);
    return handle_done(hd, read_fd(self, h, r, fd, given, wr, nwr, in_place));
}

/* op_read on the held handle's fd. */
static PyObject *read_fd(FastPath *self, const struct fuse_in_header *h, struct fuse_read_in r, int fd,
                         PyObject *given, const struct iovec *wr, int nwr, size_t *in_place) {
    int rc;
    /* the C entry: Py_True stands for the chain whose buffers are `wr` (None: no zero-copy, as chain_of says) */
    PyObject *chain = chain_of(self, h->unique, wr != NULL ? Py_True : given);
    if (chain == NULL) return NULL;
    ssize_t n;
    int e = 0;
    if (chain != Py_None) {
        GuestIov g;
        rc = wr != NULL ? guest_iov_of(wr, nwr, sizeof(struct fuse_out_header), r.size, &g)
                        : guest_iov(chain, sizeof(struct fuse_out_header), r.size, &g);
        Py_DECREF(chain);
        if (rc) return rc < 0 ? NULL : fallback(self);
        n = 0;
        if (g.n > 0) {
            Py_BEGIN_ALLOW_THREADS
            n = preadv(fd, g.iov, g.n, (off_t)r.offset);
            if (n < 0) e = errno;
            Py_END_ALLOW_THREADS
        }
        guest_iov_done(&g);
        if (n < 0) return reply_error(self, h->opcode, h->unique, e);
        if (wr != NULL) {
            char *out;
            PyObject *head = reply_new(0, h->unique, &out);
            if (head == NULL) return NULL;
            ((struct fuse_out_header *)PyBytes_AS_STRING(head))->len = (uint32_t)(sizeof(struct fuse_out_header) + n);
            self->served[h->opcode]++;
            *in_place = (size_t)n;
            return head;
        }
        PyObject *in_place = PyObject_GetAttr(self->fs, S_in_place);
        PyObject *len = in_place != NULL ? PyObject_CallFunction(in_place, "n", (Py_ssize_t)n) : NULL;
        Py_XDECREF(in_place);
        char *out;
        PyObject *head = len != NULL ? reply_new(0, h->unique, &out) : NULL;
        if (head == NULL) {
            Py_XDECREF(len);
            return NULL;
        }
        ((struct fuse_out_header *)PyBytes_AS_STRING(head))->len = (uint32_t)(sizeof(struct fuse_out_header) + n);
        self->served[h->opcode]++;
        return Py_BuildValue("(NN)", head, len);
    }
    Py_DECREF(chain);
    char *out;
    PyObject *res = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(sizeof(struct fuse_out_header) + r.size));
    if (res == NULL) return NULL;
    out = PyBytes_AS_STRING(res) + sizeof(struct fuse_out_header);
    Py_BEGIN_ALLOW_THREADS
    n = pread(fd, out, r.size, (off_t)r.offset);
    if (n < 0) e = errno;
    Py_END_ALLOW_THREADS
    if (n < 0) {
        Py_DECREF(res);
        return reply_error(self, h->opcode, h->unique, e);
    }
    struct fuse_out_header oh = {(uint32_t)(sizeof oh + n), 0, h->unique};
    memcpy(PyBytes_AS_STRING(res), &oh, sizeof oh);
    if ((size_t)n < r.size && _PyBytes_Resize(&res, (Py_ssize_t)(sizeof oh + n)) < 0) return NULL;
    self->served[h->opcode]++;
    return res;
}

/* WRITE (fs.write): one pwrite of the request's data.  Left to Python: a read-only export, KILL_SUIDGID
 * (CAP_FSETID lowered), a size that is not the data's, a WRITE bigger than the engine serves inline
 * (INLINE_WRITE_MAX: the largest a kernel sends, so none), a handle that is not a file's.
 * `body` holds `got` bytes of the body, which is `blen` long: the rest (`rest`, `nrest` entries; the ring
 * engine's answer_iov) is in guest memory, and the data is written from there with one pwritev, as the
 * C virtiofsd writes it: no copy of it in between. */
static PyObject *op_write(FastPath *self, const struct fuse_in_header *h, const char *body, size_t got,
                          const struct iovec *rest, int nrest, size_t blen) {
    struct fuse_write_in w;
    if (blen < sizeof w || got < sizeof w) return fallback(self);
    memcpy(&w, body, sizeof w);
    if (blen - sizeof w != w.size || w.size > self->inline_write_max || (w.write_flags & self->write_kill_suidgid))
        return fallback(self);
    int readonly = opt_true(self, S_readonly), fd, rc;
    if (readonly < 0) return NULL;
    if (readonly) return fallback(self);
    PyObject *hd;
    if ((rc = file_fd(self, w.fh, &fd, &hd)) <= 0) return rc < 0 ? NULL : fallback(self);
    struct iovec v_stack[WRITE_IOV], *v = v_stack;
    if (nrest > 0) {
        if (nrest >= WRITE_IOV && (v = PyMem_Malloc(((size_t)nrest + 1) * sizeof *v)) == NULL)
            return handle_done(hd, PyErr_NoMemory());
        v[0].iov_base = (void *)(body + sizeof w);
        v[0].iov_len = got - sizeof w;
        memcpy(v + 1, rest, (size_t)nrest * sizeof *v);
    }
    ssize_t n;
    int e = 0;
    Py_BEGIN_ALLOW_THREADS
    if (nrest > 0) n = pwritev(fd, v, nrest + 1, (off_t)w.offset);
    else n = pwrite(fd, body + sizeof w, w.size, (off_t)w.offset);
    if (n < 0) e = errno;
    Py_END_ALLOW_THREADS
    if (v != v_stack) PyMem_Free(v);
    if (handle_end(hd) < 0) return NULL;
    if (n < 0) return reply_error(self, h->opcode, h->unique, e);
    char *out;
    PyObject *res = reply_new(sizeof(struct fuse_write_out), h->unique, &out);
    if (res == NULL) return NULL;
    struct fuse_write_out wo = {(uint32_t)n, 0};
    memcpy(out, &wo, sizeof wo);
    self->served[h->opcode]++;
    return res;
}

/* RELEASE / RELEASEDIR (fs.release / fs.releasedir) when no lock fd or backing file is involved. */
static PyObject *op_release(FastPath *self, const struct fuse_in_header *h, const char *body, size_t blen,
                            int is_dir) {
    if (blen != sizeof(struct fuse_release_in)) return fallback(self);
    struct fuse_release_in r;
    memcpy(&r, body, sizeof r);
    PyObject *backing = PyObject_GetAttr(self->fs, S_backing);
    if (backing == NULL) return NULL;
    int has_backing = backing != Py_None;
    Py_DECREF(backing);
    if (has_backing && !is_dir) return fallback(self);
    PyObject *lock = PyObject_GetAttr(self->fs, S_lock);
    if (lock == NULL) return NULL;
    PyObject *handles = NULL, *lock_fds = NULL, *key = NULL, *hd = NULL, *result = NULL;
    PyObject *ok = PyObject_CallMethodNoArgs(lock, S_acquire);
    if (ok == NULL) goto out;
    Py_DECREF(ok);
    long long fd = -1; /* (read as a check of the handle's fields, as Python's) */
    int verdict = -1; /* -1 error, 0 fallback, 1 EBADF, 2 released */
    handles = PyObject_GetAttr(self->fs, S_handles);
    lock_fds = handles != NULL ? PyObject_GetAttr(self->fs, S_lock_fds) : NULL;
    key = lock_fds != NULL ? PyLong_FromUnsignedLongLong(r.fh) : NULL;
    if (key != NULL) {
        if (!is_dir && (!PyDict_Check(lock_fds) || PyDict_GET_SIZE(lock_fds) != 0)) {
            verdict = 0;
        } else if ((hd = PyDict_GetItemWithError(handles, key)) == NULL) {
            verdict = PyErr_Occurred() ? -1 : 1;
        } else {
            Py_INCREF(hd);
            PyObject *d = PyObject_GetAttr(hd, S_is_dir);
            int hd_dir = d != NULL ? PyObject_IsTrue(d) : -1;
            Py_XDECREF(d);
            if (hd_dir < 0 || get_long(hd, S_fd, &fd) < 0) {
                verdict = -1;
            } else if (hd_dir != is_dir) {
                verdict = 1;
            } else {
                verdict = PyDict_DelItem(handles, key) < 0 ? -1 : 2;
            }
        }
    }
    PyObject *exc_type, *exc_val, *exc_tb;
    PyErr_Fetch(&exc_type, &exc_val, &exc_tb);
    PyObject *rel = PyObject_CallMethodNoArgs(lock, S_release);
    if (exc_type != NULL) {
        Py_XDECREF(rel);
        PyErr_Restore(exc_type, exc_val, exc_tb);
        goto out;
    }
    if (rel == NULL) goto out;
    Py_DECREF(rel);
    if (verdict == 0) {
        result = fallback(self);
    } else if (verdict == 1) {
        result = reply_error(self, h->opcode, h->unique, EBADF);
    } else if (verdict == 2 && handle_give_back(hd) == 0) { /* the table's hold: closed now, or by its last user */
        char *out;
        result = reply_new(0, h->unique, &out);
        if (result != NULL) self->served[h->opcode]++;
    }
out:
    Py_XDECREF(hd);
    Py_XDECREF(key);
    Py_XDECREF(lock_fds);
    Py_XDECREF(handles);
    Py_DECREF(lock);
    return result;
}

/* FLUSH (fs.flush): close a duplicate; with no lock fds there is no owner's lock to drop. */
static PyObject *op_flush(FastPath *self, const struct fuse_in_header *h, const char *body, size_t blen) {
    if (blen != sizeof(struct fuse_flush_in)) return fallback(self);
    struct fuse_flush_in f;
    memcpy(&f, body, sizeof f);
    PyObject *lock_fds = PyObject_GetAttr(self->fs, S_lock_fds);
    if (lock_fds == NULL) return NULL;
    int none = PyDict_Check(lock_fds) && PyDict_GET_SIZE(lock_fds) == 0;
    Py_DECREF(lock_fds);
    if (!none) return fallback(self);
    PyObject *hd = handle_of(self, f.fh);
    if (hd == NULL) return PyErr_Occurred() ? NULL : reply_error(self, h->opcode, h->unique, EBADF);
    PyObject *d = PyObject_GetAttr(hd, S_is_dir);
    int hd_dir = d != NULL ? PyObject_IsTrue(d) : -1;
    Py_XDECREF(d);
    long long fd = -1;
    int rc = hd_dir < 0 ? -1 : hd_dir ? 0 : handle_hold(hd);
    if (rc < 0 || hd_dir) {
        Py_DECREF(hd);
        return rc < 0 ? NULL : reply_error(self, h->opcode, h->unique, EBADF);
    }
    if (get_long(hd, S_fd, &fd) < 0) {
        handle_done(hd, NULL);
        return NULL;
    }
    int e = 0;
    Py_BEGIN_ALLOW_THREADS
    int dfd = dup((int)fd);
    if (dfd < 0) e = errno;
    else if (close(dfd) != 0) e = errno;
    Py_END_ALLOW_THREADS
    if (handle_end(hd) < 0) return NULL;
    if (e) return reply_error(self, h->opcode, h->unique, e);
    char *out;
    PyObject *r = reply_new(0, h->unique, &out);
    if (r != NULL) self->served[h->opcode]++;
    return r;
}

static PyObject *op_statfs(FastPath *self, const struct fuse_in_header *h, size_t blen, PyObject *store) {
    if (blen != 0) return fallback(self);
    PyObject *inode = inode_ref(store, h->nodeid);
    if (inode == NULL) return PyErr_Occurred() ? NULL : fallback(self);
    PathFd p;
    int e = 0, rc = path_fd(store, inode, &p, &e);
    Py_DECREF(inode);
    if (rc == -2) return NULL;
    if (rc == 0) return fallback(self);
    if (rc < 0) return reply_error(self, h->opcode, h->unique, e);
    struct statvfs sv;
    if (p.gil) {
        rc = fstatvfs(p.fd, &sv);
        if (rc != 0) e = errno;
    } else {
        Py_BEGIN_ALLOW_THREADS
        rc = fstatvfs(p.fd, &sv);
        if (rc != 0) e = errno;
        Py_END_ALLOW_THREADS
    }
    path_fd_done(&p);
    if (rc != 0) return reply_error(self, h->opcode, h->unique, e);
    char *out;
    PyObject *r = reply_new(sizeof(struct fuse_statfs_out), h->unique, &out);
    if (r == NULL) return NULL;
    struct fuse_statfs_out so;
    memset(&so, 0, sizeof so);
    so.st.blocks = sv.f_blocks;
    so.st.bfree = sv.f_bfree;
    so.st.bavail = sv.f_bavail;
    so.st.files = sv.f_files;
    so.st.ffree = sv.f_ffree;
    so.st.bsize = (uint32_t)sv.f_bsize;
    so.st.namelen = (uint32_t)sv.f_namemax;
    so.st.frsize = (uint32_t)sv.f_frsize;
    memcpy(out, &so, sizeof so);
    self->served[h->opcode]++;
    return r;
}

/* ------------------------------------------------------------------ forget */
/* InodeStore._drop of an inode no op has lent (forget_locked leaves a lent one to Python), step for step, under
 * the store's lock: the inode leaves both tables; its O_PATH fd, its cached fd and its mount's reference go.  0,
 * or -1 with the Python error _drop would raise at the same step. */
static int drop_locked(Tables *t, PyObject *inode) {
    InodeObject *ino = INODE(inode);
    long long refs, mfd;
    PyObject *nodeid = PyLong_FromUnsignedLongLong(ino->nodeid);
    if (nodeid == NULL) return -1;
    int rc = -1;
    PyObject *key = NULL, *mount = NULL;
    if (PyObject_DelItem(t->by_id, nodeid) < 0) goto out;
    if ((key = Py_BuildValue("(KKK)", ino->dev, ino->ino, ino->mnt_id)) == NULL) goto out;
    PyObject *held = PyDict_GetItemWithError(t->by_key, key);
    if (held == NULL && PyErr_Occurred()) goto out;
    if (held == inode && PyDict_DelItem(t->by_key, key) < 0) goto out;
    if (ino->fd >= 0) {
        if (close_or_raise(ino->fd) < 0) goto out;
        ino->fd = -1;
    }
    if (ino->cached_fd >= 0) {
        if (PyObject_DelItem(t->cached, nodeid) < 0) goto out;
        if (close_or_raise(ino->cached_fd) < 0) goto out;
        ino->cached_fd = -1;
    }
    mount = ino->mount;
    Py_INCREF(mount);
    if (mount != Py_None) {
        if (get_long(mount, S_refs, &refs) < 0 || set_long(mount, S_refs, refs - 1) < 0) goto out;
        if (refs - 1 <= 0) {
            PyObject *mid = PyObject_GetAttr(mount, S_mnt_id);
            int del = mid != NULL ? PyObject_DelItem(t->mounts, mid) : -1;
            Py_XDECREF(mid);
            if (del < 0 || get_long(mount, S_fd, &mfd) < 0 || close_or_raise(mfd) < 0) goto out;
        }
    }
    rc = 0;
out:
    Py_XDECREF(mount);
    Py_XDECREF(key);
    Py_DECREF(nodeid);
    return rc;
}

/* InodeStore.forget's usual case, under the store's lock: `n` fewer lookups of a known inode that has at least
 * that many, and _drop when none is left.  1 done; 0 Python's (an unknown nodeid or an over-forget: it logs
 * them; a forget to zero of an inode an op has lent), nothing changed; -1 a Python error. */
static int forget_locked(Tables *t, uint64_t nodeid, uint64_t n) {
    PyObject *inode = inode_of(t->by_id, nodeid);
    if (inode == NULL) return PyErr_Occurred() ? -1 : 0;
    InodeObject *ino = INODE(inode);
    if (ino->nlookup < 0 || n > (unsigned long long)ino->nlookup) return 0;
    if (ino->lent > 0 && n == (unsigned long long)ino->nlookup) return 0; /* in use: its last user closes its fds */
    Py_INCREF(inode);
    int rc = 1;
    ino->nlookup -= (long long)n;
    if (ino->nlookup == 0 && drop_locked(t, inode) < 0) rc = -1;
    Py_DECREF(inode);
    return rc;
}

/* fs.forget / fs.batch_forget with no backing files (PassthroughFS: InodeStore.forget for each entry, in
 * order), the store's tables changed here under its own lock; an entry InodeStore.forget logs (unknown nodeid,
 * more than its nlookup) is its own, called with the lock let go.  `v` holds `count` fuse_forget_one (maybe
 * unaligned).  0, or -1 with a Python error (the entries after it are not done, as in the loop it replaces). */
static int forget_entries(PyObject *store, const char *v, size_t count) {
    Tables t = {NULL, NULL, NULL, NULL};
    PyObject *lock = PyObject_GetAttr(store, S_lock);
    if (lock == NULL || tables_of(store, &t) < 0) {
        Py_XDECREF(lock);
        tables_done(&t);
        return -1;
    }
    int locked = 0, rc = 0;
    for (size_t i = 0; i < count && rc == 0; i++) {
        struct fuse_forget_one one;
        memcpy(&one, v + i * sizeof one, sizeof one);
        if (one.nodeid == FUSE_ROOT_ID) continue; /* never forgotten */
        if (!locked && lock_call(lock, S_acquire) < 0) {
            rc = -1;
            break;
        }
        locked = 1;
        int r = forget_locked(&t, one.nodeid, one.nlookup);
        if (r == 1) continue;
        locked = 0;
        if (release_keeping(lock) < 0 || r < 0) {
            rc = -1;
            break;
        }
        PyObject *res = PyObject_CallMethod(store, "forget", "KK", (unsigned long long)one.nodeid,
                                            (unsigned long long)one.nlookup);
        if (res == NULL) rc = -1;
        Py_XDECREF(res);
    }
    if (locked && release_keeping(lock) < 0) rc = -1;
    Py_DECREF(lock);
    tables_done(&t);
    return rc;
}

/* FORGET / BATCH_FORGET (fs.forget, fs.batch_forget): decoded here, and the store's nlookup accounting done
 * here too (forget_entries); with backing files (FUSE passthrough, which forgets an idle one with its inode)
 * the filesystem's own methods. */
static PyObject *op_forget(FastPath *self, const struct fuse_in_header *h, const char *body, size_t blen,
                           int batch) {
    struct fuse_forget_one single;
    const char *entries;
    size_t count;
    if (!batch) {
        if (blen != sizeof(struct fuse_forget_in)) return fallback(self);
        struct fuse_forget_in f;
        memcpy(&f, body, sizeof f);
        single.nodeid = h->nodeid;
        single.nlookup = f.nlookup;
        entries = (const char *)&single;
        count = 1;
    } else {
        if (blen < sizeof(struct fuse_batch_forget_in)) return fallback(self);
        struct fuse_batch_forget_in b;
        memcpy(&b, body, sizeof b);
        if ((blen - sizeof b) != (size_t)b.count * sizeof(struct fuse_forget_one)) return fallback(self);
        entries = body + sizeof b;
        count = b.count;
    }
    int rc = -1;
    PyObject *backing = PyObject_GetAttr(self->fs, S_backing);
    if (backing != NULL && backing == Py_None) {
        PyObject *store = PyObject_GetAttr(self->fs, S_store);
        rc = store != NULL ? forget_entries(store, entries, count) : -1;
        Py_XDECREF(store);
    } else if (backing != NULL) {
        PyObject *res = NULL;
        if (!batch) {
            res = PyObject_CallMethod(self->fs, "forget", "OKK", Py_None, (unsigned long long)single.nodeid,
                                      (unsigned long long)single.nlookup);
        } else {
            PyObject *list = PyList_New((Py_ssize_t)count);
            for (size_t i = 0; list != NULL && i < count; i++) {
                struct fuse_forget_one one;
                memcpy(&one, entries + i * sizeof one, sizeof one);
                PyObject *pair = Py_BuildValue("(KK)", (unsigned long long)one.nodeid, (unsigned long long)one.nlookup);
                if (pair == NULL) Py_CLEAR(list);
                else PyList_SET_ITEM(list, (Py_ssize_t)i, pair);
            }
            res = list != NULL ? PyObject_CallMethodObjArgs(self->fs, S_batch_forget, Py_None, list, NULL) : NULL;
            Py_XDECREF(list);
        }
        rc = res != NULL ? 0 : -1;
        Py_XDECREF(res);
    }
    Py_XDECREF(backing);
    self->served[h->opcode]++;
    if (rc < 0) { /* counted as the engine counts an op that raised; the caller logs it */
        int err = EIO;
        if (PyErr_ExceptionMatches(PyExc_OSError)) {
            PyObject *t, *v, *tb;
            PyErr_Fetch(&t, &v, &tb);
            PyErr_NormalizeException(&t, &v, &tb);
            PyObject *en = v != NULL ? PyObject_GetAttrString(v, "errno") : NULL;
            if (en != NULL && PyLong_Check(en)) err = (int)PyLong_AsLong(en);
            Py_XDECREF(en);
            PyErr_Restore(t, v, tb);
            if (err < 1 || err > 4095) err = EIO;
        }
        PyObject *t, *v, *tb;
        PyErr_Fetch(&t, &v, &tb);
        count_error(self, h->opcode, err);
        PyErr_Restore(t, v, tb);
        return NULL;
    }
    return PyBytes_FromStringAndSize("", 0);
}

/* ------------------------------------------------------------------ the type */
/* One request: the Python call form's `chain` (or NULL), or the C entry's `wr`/`nwr`/`in_place` (ring_answer.h). */
static PyObject *dispatch(FastPath *self, const char *buf, size_t len, PyObject *chain, const struct iovec *wr,
                          int nwr, size_t *in_place) {
    PyObject *result = NULL;
    struct fuse_in_header h;
    if (len < sizeof h) return fallback(self);
    memcpy(&h, buf, sizeof h);
    /* Only a plain message: its length exact, no extensions (the decoder's checks stay Python's). */
    if (h.len != len || h.total_extlen != 0 || len > self->max_message) return fallback(self);
    const char *body = buf + sizeof h;
    size_t blen = len - sizeof h;
    unsigned int o = h.opcode;
    if (o == self->op[K_GETATTR] || o == self->op[K_LOOKUP] || o == self->op[K_STATFS] || o == self->op[K_UNLINK]
        || o == self->op[K_RMDIR] || o == self->op[K_CREATE] || o == self->op[K_OPEN] || o == self->op[K_OPENDIR]) {
        PyObject *store = PyObject_GetAttr(self->fs, S_store);
        if (store == NULL) return NULL;
        if (o == self->op[K_GETATTR]) result = op_getattr(self, &h, body, blen, store);
        else if (o == self->op[K_LOOKUP]) result = op_lookup(self, &h, body, blen, store);
        else if (o == self->op[K_UNLINK]) result = op_unlink(self, &h, body, blen, store, 0);
        else if (o == self->op[K_RMDIR]) result = op_unlink(self, &h, body, blen, store, AT_REMOVEDIR);
        else if (o == self->op[K_CREATE]) result = op_create(self, &h, body, blen, store);
        else if (o == self->op[K_OPEN]) result = op_open(self, &h, body, blen, store, 0);
        else if (o == self->op[K_OPENDIR]) result = op_open(self, &h, body, blen, store, 1);
        else result = op_statfs(self, &h, blen, store);
        Py_DECREF(store);
    } else if (o == self->op[K_RELEASE]) {
        result = op_release(self, &h, body, blen, 0);
    } else if (o == self->op[K_RELEASEDIR]) {
        result = op_release(self, &h, body, blen, 1);
    } else if (o == self->op[K_FLUSH]) {
        result = op_flush(self, &h, body, blen);
    } else if (o == self->op[K_READ]) {
        result = op_read(self, &h, body, blen, chain, wr, nwr, in_place);
    } else if (o == self->op[K_WRITE]) {
        result = op_write(self, &h, body, blen, NULL, 0, blen);
    } else if (o == self->op[K_FORGET]) {
        result = op_forget(self, &h, body, blen, 0);
    } else if (o == self->op[K_BATCH_FORGET]) {
        result = op_forget(self, &h, body, blen, 1);
    } else {
        result = fallback(self);
    }
    return result;
}

static PyObject *fast_call(PyObject *op, PyObject *args, PyObject *kwargs) {
    PyObject *req, *chain = NULL;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "FastPath(request[, chain]) takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O|O:FastPath", &req, &chain)) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(req, &view, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *result = dispatch((FastPath *)op, view.buf, (size_t)view.len, chain, NULL, 0, NULL);
    PyBuffer_Release(&view);
    return result;
}

/* The ring engine's C entry (SplitQueue.serve_fast, ring_answer.h): the same answers without a Chain object
 * or a Python frame; a READ's data goes straight into `wr`. */
static PyObject *fast_answer(PyObject *op, const char *req, size_t len, const struct iovec *wr, int nwr,
                             size_t *in_place) {
    *in_place = 0;
    return dispatch((FastPath *)op, req, len, NULL, wr, nwr, in_place);
}

/* The C entry for a request longer than the engine's stack (ring_answer.h's answer_iov): a WRITE's data is
 * written from guest memory where it is; anything else asks to be gathered (NULL, no exception) and comes
 * back through fast_answer.  The checks are dispatch()'s, in its order. */
static PyObject *fast_answer_iov(PyObject *op, const char *head, size_t hlen, const struct iovec *rd, int nrd,
                                 size_t len, const struct iovec *wr, int nwr, size_t *in_place) {
    FastPath *self = (FastPath *)op;
    struct fuse_in_header h;
    (void)wr;
    (void)nwr;
    *in_place = 0;
    if (hlen < sizeof h + sizeof(struct fuse_write_in) || hlen > len || nrd >= IOV_MAX) return NULL;
    memcpy(&h, head, sizeof h);
    if (h.opcode != self->op[K_WRITE]) return NULL;
    if (h.len != len || h.total_extlen != 0 || len > self->max_message) return fallback(self);
    return op_write(self, &h, head + sizeof h, hlen - sizeof h, rd, nrd, len - sizeof h);
}

static struct rc_answerer fast_answerer = {RC_ANSWERER_VERSION, sizeof(struct rc_answerer), fast_answer,
                                           fast_answer_iov};

static int fast_init(PyObject *op, PyObject *args, PyObject *kwargs) {
    FastPath *self = (FastPath *)op;
    static char *kw[] = {"fs", "opcodes", "getattr_fh", "attr_submount", "max_message", "stat_type", "handle_type",
                         "prepare_thread", "open_kill_suidgid", "write_kill_suidgid", "inline_io_max",
                         "inline_write_max", NULL};
    PyObject *fs, *opcodes, *stat_type, *handle_type, *prepare_thread;
    unsigned int getattr_fh, attr_submount, open_kill_suidgid, write_kill_suidgid;
    unsigned long long max_message, inline_io_max, inline_write_max = ULLONG_MAX; /* not given: inline_io_max */
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!IIKOOOIIK|K:FastPath", kw, &fs, &PyDict_Type, &opcodes,
                                     &getattr_fh, &attr_submount, &max_message, &stat_type, &handle_type,
                                     &prepare_thread, &open_kill_suidgid, &write_kill_suidgid, &inline_io_max,
                                     &inline_write_max))
        return -1;
    for (int i = 0; i < K_N; i++) {
        PyObject *v = PyDict_GetItemString(opcodes, op_keys[i]);
        if (v == NULL) {
            PyErr_Format(PyExc_KeyError, "FastPath: opcodes has no %s", op_keys[i]);
            return -1;
        }
        unsigned long x = PyLong_AsUnsignedLong(v);
        if (PyErr_Occurred()) return -1;
        if (x >= NOPS) {
            PyErr_Format(PyExc_ValueError, "FastPath: opcode %s = %lu is out of range", op_keys[i], x);
            return -1;
        }
        self->op[i] = (unsigned int)x;
    }
    Py_INCREF(fs);
    Py_XSETREF(self->fs, fs);
    self->getattr_fh = getattr_fh;
    self->attr_submount = attr_submount;
    self->max_message = max_message;
    Py_INCREF(stat_type);
    Py_XSETREF(self->stat_type, stat_type);
    Py_INCREF(handle_type);
    Py_XSETREF(self->handle_type, handle_type);
    Py_INCREF(prepare_thread);
    Py_XSETREF(self->prepare_thread, prepare_thread);
    self->open_kill_suidgid = open_kill_suidgid;
    self->write_kill_suidgid = write_kill_suidgid;
    self->inline_io_max = inline_io_max;
    self->inline_write_max = inline_write_max == ULLONG_MAX ? inline_io_max : inline_write_max;
    if (self->not_owned == NULL) {
        if ((self->not_owned = PyDict_New()) == NULL) return -1;
        if (PyDict_SetItemString(self->not_owned, "owned", Py_False) < 0) return -1;
    }
    if (self->errors == NULL && (self->errors = PyDict_New()) == NULL) return -1;
    return 0;
}

static PyObject *fast_counts(PyObject *op, PyObject *unused) {
    FastPath *self = (FastPath *)op;
    (void)unused;
    PyObject *served = PyDict_New();
    if (served == NULL) return NULL;
    for (int i = 0; i < NOPS; i++) {
        if (!self->served[i]) continue;
        PyObject *k = PyLong_FromLong(i), *v = PyLong_FromUnsignedLongLong(self->served[i]);
        if (k == NULL || v == NULL || PyDict_SetItem(served, k, v) < 0) {
            Py_XDECREF(k);
            Py_XDECREF(v);
            Py_DECREF(served);
            return NULL;
        }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    PyObject *errors = PyDict_Copy(self->errors);
    if (errors == NULL) {
        Py_DECREF(served);
        return NULL;
    }
    return Py_BuildValue("(NNK)", served, errors, self->fallbacks);
}

static int fast_traverse(PyObject *op, visitproc visit, void *arg) {
    FastPath *self = (FastPath *)op;
    Py_VISIT(self->fs);
    Py_VISIT(self->errors);
    Py_VISIT(self->stat_type);
    Py_VISIT(self->handle_type);
    Py_VISIT(self->prepare_thread);
    Py_VISIT(self->not_owned);
    return 0;
}

static int fast_clear(PyObject *op) {
    FastPath *self = (FastPath *)op;
    Py_CLEAR(self->fs);
    Py_CLEAR(self->errors);
    Py_CLEAR(self->stat_type);
    Py_CLEAR(self->handle_type);
    Py_CLEAR(self->prepare_thread);
    Py_CLEAR(self->not_owned);
    return 0;
}

static void fast_dealloc(PyObject *op) {
    PyObject_GC_UnTrack(op);
    fast_clear(op);
    Py_TYPE(op)->tp_free(op);
}

static PyMethodDef fast_methods[] = {
    {"counts", fast_counts, METH_NOARGS,
     "counts() -> ({opcode: served}, {(opcode, errno): errors}, fallbacks): what this path answered"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FastPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "daemon.passthrough._fast.FastPath",
    .tp_basicsize = sizeof(FastPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "FastPath(fs, opcodes, getattr_fh, attr_submount, max_message, stat_type, handle_type, prepare_thread,"
              " open_kill_suidgid, write_kill_suidgid, inline_io_max[, inline_write_max])(request[, chain])"
              " -> reply bytes | (header, in place) | b'' | None",
    .tp_new = PyType_GenericNew,
    .tp_init = fast_init,
    .tp_call = fast_call,
    .tp_traverse = fast_traverse,
    .tp_clear = fast_clear,
    .tp_dealloc = fast_dealloc,
    .tp_methods = fast_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "daemon.passthrough._fast",
    "The passthrough filesystem's fast path for the commonest metadata requests (twin: the Python op table).",
    -1, NULL, NULL, NULL, NULL, NULL,
};

#define INTERN(var, s) \
    if ((var = PyUnicode_InternFromString(s)) == NULL) return NULL

PyMODINIT_FUNC PyInit__fast(void) {
    INTERN(S_store, "store");
    INTERN(S_by_id, "_by_id");
    INTERN(S_by_key, "_by_key");
    INTERN(S_lock, "_lock");
    INTERN(S_fd, "fd");
    INTERN(S_mode, "mode");
    INTERN(S_mnt_id, "mnt_id");
    INTERN(S_handles, "_handles");
    INTERN(S_is_dir, "is_dir");
    INTERN(S_users, "users");
    INTERN(S_unclosed, "unclosed");
    INTERN(S_lock_fds, "_lock_fds");
    INTERN(S_backing, "backing");
    INTERN(S_timeout, "timeout");
    INTERN(S_submounts, "submounts");
    INTERN(S_acquire, "acquire");
    INTERN(S_release, "release");
    INTERN(S_batch_forget, "batch_forget");
    INTERN(S_zero_gen, "zero_submount_generation");
    INTERN(S_opts, "opts");
    INTERN(S_readonly, "readonly");
    INTERN(S_find_or_add, "find_or_add");
    INTERN(S_next_fh, "_next_fh");
    INTERN(S_fopen_file, "_fopen_file");
    INTERN(S_fopen_dir, "_fopen_dir");
    INTERN(S_writeback, "writeback");
    INTERN(S_passthrough, "passthrough");
    INTERN(S_switch_creds, "_switch_creds");
    INTERN(S_kernel_groups, "kernel_groups");
    INTERN(S_proc_groups, "proc_groups");
    INTERN(S_proc, "proc");
    INTERN(S_chain_for, "chain_for");
    INTERN(S_writable, "writable");
    INTERN(S_in_place, "in_place");
    INTERN(S_keep_fd, "keep_fd");
    INTERN(S_drop_cached_fd, "drop_cached_fd");
    INTERN(S_orphans, "_orphans");
    INTERN(S_settle_locked, "_settle_locked");
    INTERN(S_refs, "refs");
    INTERN(S_cached, "_cached");
    INTERN(S_mounts, "_mounts");
    INTERN(S_generation_, "_generation");
    INTERN(S_next_id, "_next_id");
    INTERN(S_fd_cache_max, "fd_cache_max");
    INTERN(S_evict_locked, "_evict_locked");
    if (PyType_Ready(&FastPathType) < 0 || PyType_Ready(&InodeType) < 0) return NULL;
    /* FastPath.answerer: the C entry for the ring engine (ring_answer.h) */
    PyObject *cap = PyCapsule_New(&fast_answerer, RC_ANSWERER_CAPSULE, NULL);
    if (cap == NULL) return NULL;
    int bad = PyDict_SetItemString(FastPathType.tp_dict, "answerer", cap);
    Py_DECREF(cap);
    if (bad < 0) return NULL;
    PyType_Modified(&FastPathType);
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&FastPathType);
    if (PyModule_AddObject(m, "FastPath", (PyObject *)&FastPathType) < 0) {
        Py_DECREF(&FastPathType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&InodeType);
    if (PyModule_AddObject(m, "Inode", (PyObject *)&InodeType) < 0) {
        Py_DECREF(&InodeType);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *fields = PyTuple_New(sizeof inode_kw / sizeof inode_kw[0] - 1);
    for (Py_ssize_t i = 0; fields != NULL && inode_kw[i] != NULL; i++) {
        PyObject *name = PyUnicode_FromString(inode_kw[i]);
        if (name == NULL) Py_CLEAR(fields);
        else PyTuple_SET_ITEM(fields, i, name);
    }
    if (fields == NULL || PyModule_AddObject(m, "INODE_FIELDS", fields) < 0) { /* Inode's constructor order */
        Py_XDECREF(fields);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "SIZE_IN_HEADER", sizeof(struct fuse_in_header));
    PyModule_AddIntConstant(m, "SIZE_ENTRY_OUT", sizeof(struct fuse_entry_out));
    PyModule_AddIntConstant(m, "SIZE_ATTR_OUT", sizeof(struct fuse_attr_out));
    PyModule_AddIntConstant(m, "SIZE_STATFS_OUT", sizeof(struct fuse_statfs_out));
    PyModule_AddIntConstant(m, "SIZE_RELEASE_IN", sizeof(struct fuse_release_in));
    PyModule_AddIntConstant(m, "SIZE_FLUSH_IN", sizeof(struct fuse_flush_in));
    PyModule_AddIntConstant(m, "SIZE_GETATTR_IN", sizeof(struct fuse_getattr_in));
    PyModule_AddIntConstant(m, "SIZE_CREATE_IN", sizeof(struct fuse_create_in));
    PyModule_AddIntConstant(m, "SIZE_OPEN_IN", sizeof(struct fuse_open_in));
    PyModule_AddIntConstant(m, "SIZE_OPEN_OUT", sizeof(struct fuse_open_out));
    PyModule_AddIntConstant(m, "SIZE_READ_IN", sizeof(struct fuse_read_in));
    PyModule_AddIntConstant(m, "SIZE_WRITE_IN", sizeof(struct fuse_write_in));
    PyModule_AddIntConstant(m, "SIZE_WRITE_OUT", sizeof(struct fuse_write_out));
    return m;
}
